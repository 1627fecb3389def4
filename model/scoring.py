"""Multiple-choice scoring: log p(choice | stream, question) for every choice, in bounded memory.

After the question is in the (working) cache, choice k with tokens c_0..c_{m-1} scores
``log p(c_0 | question) + sum_i log p(c_{i+1} | question, c_0..c_i)``. Only c_0..c_{m-2} need
a forward (the last token predicts nothing we score), so one-token choices cost nothing more.
Short choices are packed into tree forwards of at most ``StreamConfig.choice_chunk_tokens``
tokens (each branch sees the cache and its own earlier tokens); a longer choice runs alone,
causally, in pieces of that size. Only the scored log-probabilities are kept: memory grows with
the chunk size, not with the number of choices times the vocabulary.
"""
from __future__ import annotations

import torch

from .kv_cache_manager import Transaction
from .positions import text_positions

TREE_ATTENTION = ("sdpa", "eager")  # base implementations that take an arbitrary additive 4-D mask


def score_choices(stream, txn: Transaction, question_logits: torch.Tensor, choice_ids: list[list[int]]) -> list[float]:
    """question_logits: (V,) logits after the question; returns the summed log-probability of each choice.

    Runs on forks of ``txn``; the transaction itself is left where it was.
    """
    first = torch.log_softmax(question_logits.float(), -1)  # (V,)
    scores = [float(first[ids[0]]) for ids in choice_ids]
    limit = stream.config.choice_chunk_tokens
    tree = stream.model.config._attn_implementation in TREE_ATTENTION
    groups, current, size = [], [], 0
    for k, ids in enumerate(choice_ids):
        n = len(ids) - 1  # tokens to feed
        if n == 0:
            continue
        if not tree or n > limit:
            scores[k] += _causal_score(stream, txn, ids, limit)
            continue
        if size + n > limit:
            groups.append(current)
            current, size = [], 0
        current.append(k)
        size += n
    if current:
        groups.append(current)
    for group in groups:
        for k, s in zip(group, _tree_scores(stream, txn, [choice_ids[k] for k in group])):
            scores[k] += s
    return scores


def _gather(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """(n, V) logits, n targets -> (n,) log-probabilities of the targets (one log-softmax per row)."""
    t = torch.tensor(targets, device=logits.device)[:, None]
    return torch.log_softmax(logits.float(), -1).gather(1, t)[:, 0]


def _tree_scores(stream, txn: Transaction, branches: list[list[int]]) -> list[float]:
    """One forward over several branches (inputs c_0..c_{m-2} each) packed after the working head."""
    lengths = [len(ids) - 1 for ids in branches]
    flat = [t for ids in branches for t in ids[:-1]]
    pos = torch.cat([text_positions(txn.state.next_position, n) for n in lengths], dim=1)  # (3, L)
    logits = stream.feed_ids(txn.fork(), flat, "all", positions=pos, tree=lengths)[0]  # (L, V)
    logp = _gather(logits, [t for ids in branches for t in ids[1:]])
    return [float(part.sum()) for part in logp.split(lengths)]


def _causal_score(stream, txn: Transaction, ids: list[int], limit: int) -> float:
    """One branch fed alone on a fork, in causal pieces of at most ``limit`` tokens."""
    fork, total = txn.fork(), 0.0
    for i in range(0, len(ids) - 1, limit):
        piece = ids[i:min(i + limit, len(ids) - 1)]
        logits = stream.feed_ids(fork, piece, logits="all")[0]  # (len(piece), V)
        total += float(_gather(logits, ids[i + 1:i + 1 + len(piece)]).sum())
    return total
