"""Multiple-choice scoring: which forwards score every choice in bounded memory, and the arithmetic.

After the question is in the (working) cache, choice k with tokens c_0..c_{m-1} scores
``log p(c_0 | question) + sum_i log p(c_{i+1} | question, c_0..c_i)``. Only c_0..c_{m-2} need
a forward (the last token predicts nothing we score), so one-token choices cost nothing more.
Short choices are packed into tree forwards of at most ``StreamConfig.choice_chunk_tokens``
tokens (each branch sees the cache and its own earlier tokens); a longer choice runs alone,
causally, in pieces of that size. Only the scored log-probabilities are kept: memory grows with
the chunk size, not with the number of choices times the vocabulary.

Pure functions: ``plan`` says which forwards to run, ``tree_inputs``/``gather`` build their
inputs and read their outputs; the stream runs them (``Stream.score_choices``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .positions import text_positions

TREE_ATTENTION = ("sdpa", "eager")  # base implementations that take an arbitrary additive 4-D mask


@dataclass(frozen=True)
class Plan:
    """The forwards that score a choice set: ``trees`` (groups of choice indices packed into one tree forward
    each) and ``alone`` (choice indices fed causally, in pieces of ``limit`` tokens, each on its own fork)."""

    trees: tuple[tuple[int, ...], ...]
    alone: tuple[int, ...]
    limit: int


def plan(choice_ids: list[list[int]], limit: int, tree: bool) -> Plan:
    """Group the choices: packed trees of at most ``limit`` fed tokens where ``tree`` masks are supported."""
    groups, alone, current, size = [], [], [], 0
    for k, ids in enumerate(choice_ids):
        n = len(ids) - 1  # tokens to feed
        if n == 0:
            continue
        if not tree or n > limit:
            alone.append(k)
            continue
        if size + n > limit:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(k)
        size += n
    if current:
        groups.append(tuple(current))
    return Plan(tuple(groups), tuple(alone), limit)


def first_scores(question_logits: torch.Tensor, choice_ids: list[list[int]]) -> list[float]:
    """(V,) logits after the question -> log p(c_0 | question) of each choice."""
    first = torch.log_softmax(question_logits.float(), -1)  # (V,)
    return [float(first[ids[0]]) for ids in choice_ids]


def tree_inputs(branches: list[list[int]], next_position: int) -> tuple[list[int], torch.Tensor, list[int]]:
    """Branches (choices) -> (their fed ids c_0..c_{m-2} packed, (3, L) positions (each branch from
    ``next_position``), branch lengths)."""
    lengths = [len(ids) - 1 for ids in branches]
    flat = [t for ids in branches for t in ids[:-1]]
    pos = torch.cat([text_positions(next_position, n) for n in lengths], dim=1)  # (3, L)
    return flat, pos, lengths


def tree_scores(logits: torch.Tensor, branches: list[list[int]]) -> list[float]:
    """(L, V) logits of a tree forward -> each branch's summed log-probability of c_1..c_{m-1}."""
    lengths = [len(ids) - 1 for ids in branches]
    logp = gather(logits, [t for ids in branches for t in ids[1:]])
    return [float(part.sum()) for part in logp.split(lengths)]


def pieces(ids: list[int], limit: int) -> list[tuple[list[int], list[int]]]:
    """A choice fed alone -> [(fed tokens, the tokens they predict)] in pieces of at most ``limit``."""
    out = []
    for i in range(0, len(ids) - 1, limit):
        piece = ids[i:min(i + limit, len(ids) - 1)]
        out.append((piece, ids[i + 1:i + 1 + len(piece)]))
    return out


def gather(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """(n, V) logits, n targets -> (n,) log-probabilities of the targets (one log-softmax per row)."""
    t = torch.tensor(targets, device=logits.device)[:, None]
    return torch.log_softmax(logits.float(), -1).gather(1, t)[:, 0]
