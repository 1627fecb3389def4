"""Token streaming: an answer's text, piece by piece, as it is decoded (``VideoStreamInference.ask_stream``).

``AnswerStream`` iterates text pieces; once exhausted its ``answer`` is the full ``Answer``
(the same tokens and text ``ask`` would give). It holds the stream's lock while it is open, so
another thread's calls wait until it is exhausted or closed; breaking out early (or ``close()``)
drops the answer's transaction: the stream is left exactly as before (isolation holds). With
``update_state=True`` the answer is committed only when the iteration completes.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

import torch

from .arguments import check_max_new_tokens
from .decoding import Answer, Decoding
from .prompt import decode
from .recall import recalled
from .text_stream import StreamerFeed, TextPieces, special_token_ids


class _Result:
    answer: Optional[Answer] = None
    first_piece_s: Optional[float] = None


class AnswerStream:
    """Iterator of text pieces of one answer; ``answer`` is set when it completes (None if closed early).

    The generator behind it does not refer back to this object, so dropping the last reference
    (what ``break`` out of ``for piece in engine.ask_stream(...)`` does) closes it at once.
    """

    def __init__(self, engine, question: str, update_state: bool, max_new_tokens: int, sampler, streamer, t0: float):
        self._result = _Result()
        self._pieces = _pieces(self._result, engine, question, update_state, max_new_tokens, sampler, streamer, t0)

    @property
    def answer(self) -> Optional[Answer]:
        return self._result.answer

    @property
    def first_piece_s(self) -> Optional[float]:
        """Question arrival -> first non-empty text piece."""
        return self._result.first_piece_s

    def __iter__(self) -> "AnswerStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop decoding and roll the answer back (also what breaking out of a for loop does)."""
        self._pieces.close()

    def __enter__(self) -> "AnswerStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pieces(holder: _Result, engine, question, update_state, max_new_tokens, sampler, streamer,
            t0) -> Iterator[str]:
    """The generator behind ``AnswerStream``: owns the lock from its first step to its last."""
    engine._acquire()
    engine._open_stream = True
    try:
        txn, decoding, first_logits = start_answer(engine, question, max_new_tokens, sampler, t0)
        text = TextPieces(engine.tokenizer)
        with streamer_feed(streamer, engine.tokenizer) as put:
            for tok in decoding:
                put(tok)
                piece = text.push(tok)
                if piece:
                    holder.first_piece_s = holder.first_piece_s or time.perf_counter() - t0
                    yield piece
            tail = text.flush()
        if tail:
            yield tail
        holder.answer = finish_answer(engine, txn, decoding, first_logits, update_state, t0)
        if update_state:
            engine.kv.settle(txn)
        engine._open_stream = False
    except BaseException:
        engine._open_stream = False
        engine._lock.release()
        raise
    if not update_state:
        engine._lock.release(); return  # noqa: E702
    return engine.kv.commit(txn, None, then=engine._lock.release)  # the last step: see engine._transaction


@torch.no_grad()
def start_answer(engine, question: str, max_new_tokens: int, sampler, t0: float):
    """Open the question in a new transaction -> (txn, a ``Decoding`` that feeds tokens into it, (V,) first logits)."""
    txn = engine.kv.begin()
    first = engine._stream.open_question(txn, question)  # (1, V)
    check_max_new_tokens(max_new_tokens, engine.max_positions - txn.state.next_position)

    @torch.no_grad()
    def feed(tok: int) -> torch.Tensor:
        return engine._stream.feed_ids(txn, [tok], logits="last")[:, -1]  # (1, V)

    return txn, Decoding(first, feed, sampler, engine.stop_ids, max_new_tokens, engine._sync, t0), first[0]


@torch.no_grad()
def finish_answer(engine, txn, decoding: Decoding, first_logits: torch.Tensor, update_state: bool, t0: float) -> Answer:
    """Keep question + answer as a turn (``update_state``; committed by the caller) and build the ``Answer``."""
    if update_state:
        engine._stream.commit_answer(txn, decoding.tokens[decoding.fed:])
    engine._sync()
    return Answer(decode(engine.tokenizer, decoding.tokens), decoding.tokens, decoding.ttft_s,
                  time.perf_counter() - t0, decoding.finish_reason, first_logits, recalled(txn.state.layout))


def streamer_feed(streamer, tokenizer):
    """A context giving ``put(token)``: feeds a transformers streamer (``end()`` once, also on errors), or nothing."""
    return StreamerFeed(streamer, skip_ids=special_token_ids(tokenizer)) if streamer is not None else _NoStreamer()


class _NoStreamer:
    def __enter__(self):
        return lambda tok: None

    def __exit__(self, *exc) -> None:
        return None
