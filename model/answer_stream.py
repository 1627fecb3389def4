"""Token streaming: an answer's text, piece by piece, as it is decoded (``VideoStreamInference.ask_stream``).

``AnswerStream`` iterates text pieces; once exhausted its ``answer`` is the full ``Answer``
(the same tokens and text ``ask`` would give). It holds the stream while it is open, so other
calls wait until it is exhausted or closed; any thread may step or close it. Breaking out early
(or ``close()``) drops the answer's transaction: the stream is left exactly as before (isolation
holds). With ``update_state=True`` the answer is committed only when the iteration completes.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

import torch

from .arguments import check_max_new_tokens
from .decoding import Answer, Decoding
from .prompt import decode, encode
from .recall import recalled
from .text_stream import StreamerFeed, TextPieces, special_token_ids
from .transaction import OpenAnswer


class _Result:
    answer: Optional[Answer] = None
    first_piece_s: Optional[float] = None


class AnswerStream:
    """Iterator of text pieces of one answer; ``answer`` is set when it completes (None if closed early).

    From its first piece to its last it holds the stream (``transaction.OpenAnswer``): other calls
    wait. Any thread may step or close it (a server hands answers between threads); each step runs
    under the stream's lock. Dropping an unfinished answer (``break`` out of a for loop drops the
    last reference) frees the stream at once: its transaction goes with it, nothing was committed.
    """

    def __init__(self, engine, question_ids: list[int], update_state: bool, max_new_tokens: int, sampler, streamer,
                 t0: float):
        self._engine = engine
        self._hold = OpenAnswer()
        self._result = _Result()
        self._pieces = _pieces(self._result, engine, question_ids, update_state, max_new_tokens, sampler, streamer, t0)

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
        if self._hold.done.is_set():
            raise StopIteration
        try:
            piece = self._engine._transaction(self._step, answer=self._hold)
        except BaseException:
            self._result.answer = None  # the last step's commit was refused: no answer came of it
            raise
        if piece is None:
            raise StopIteration
        return piece

    def _step(self):
        """One piece under the stream's lock -> (None, piece), or at the end (txn to commit or None, None)."""
        try:
            return None, next(self._pieces)
        except StopIteration as end:
            self._engine._end_answer(self._hold)  # the lock is still held: the next call runs after the commit
            return end.value, None
        except BaseException:
            self._engine._end_answer(self._hold)
            raise

    def close(self) -> None:
        """Stop decoding and roll the answer back (also what breaking out of a for loop does)."""
        if not self._hold.started:
            self._pieces.close()  # never stepped: it holds nothing
            self._hold.done.set()
        elif not self._hold.done.is_set():
            self._engine._transaction(self._close_step, answer=self._hold)

    def _close_step(self):
        try:
            self._pieces.close()  # runs the streamer's end(); the answer's transaction is dropped
        finally:
            self._engine._end_answer(self._hold)
        return None, None

    def __del__(self) -> None:
        # Dropped unfinished: nothing was committed, and its transaction goes with it; free the stream.
        hold = getattr(self, "_hold", None)
        if hold is not None and hold.started:
            self._engine._end_answer(hold)

    def __enter__(self) -> "AnswerStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pieces(holder: _Result, engine, question_ids, update_state, max_new_tokens, sampler, streamer,
            t0) -> Iterator[str]:
    """The generator behind ``AnswerStream``: text pieces, then returns the transaction to commit (or None).

    It never takes the lock itself: ``AnswerStream`` runs each of its steps as an engine transaction.
    """
    txn, decoding, first_logits = start_answer(engine, question_ids, update_state, max_new_tokens, sampler, t0)
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
    return txn if update_state else None


@torch.no_grad()
def start_answer(engine, question_ids: list[int], update_state: bool, max_new_tokens: int, sampler, t0: float):
    """Open the question in a new transaction -> (txn, a ``Decoding`` that feeds tokens into it, (V,) first logits).

    Positions (and, for a turn kept with ``update_state``, a bounded stream's per-call budget) are
    checked for the question and ``max_new_tokens`` before the answer is decoded.
    """
    txn = engine.kv.begin(commits=update_state)
    check_max_new_tokens(max_new_tokens, engine.max_positions - txn.state.next_position - len(question_ids))
    first = engine._stream.open_question(txn, question_ids)  # (1, V)
    check_max_new_tokens(max_new_tokens, engine.max_positions - txn.state.next_position)
    if engine.kv.bounded:
        engine.kv.check_call(txn, max_new_tokens + len(encode(engine.tokenizer, engine.pieces.answer_tail)))

    @torch.no_grad()
    def feed(tok: int) -> torch.Tensor:
        return engine._stream.feed_answer_token(txn, tok)  # (1, V)

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
