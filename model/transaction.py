"""Every public call of an engine is a transaction under the stream's hold.

The engine's calls run ``work(*args) -> (txn or None, result)`` through ``_transaction``: the
work builds a ``Transaction`` (a working copy of the stream's head) and the commit, one
assignment that also releases the lock, is the call's very last step. A call that raised,
whatever it raised (``KeyboardInterrupt`` and out-of-memory included) and wherever, has
committed nothing; a call that committed returns normally: an exception that lands after the
commit (Ctrl-C right after it) is raised by that thread's next call on the engine instead.

The hold: a lock taken for one call, or for one step of an open ``ask_stream`` answer. An open
answer keeps the stream from its first piece to its last (``OpenAnswer``), whichever threads
step or close it; other calls wait for it. Calling the engine from inside one of its own calls
(a streamer's ``put()``) raises: it could only deadlock or tear the call.
"""
from __future__ import annotations

import sys
import threading
from typing import Optional


class OpenAnswer:
    """An ``ask_stream`` answer's hold on its stream, from its first piece until it ends.

    ``thread``: the thread that stepped it last (a call from that thread while the answer is open
    would wait for itself, so it raises). The ``Thread`` object, not its ident: an ended thread's
    ident is reused by the next thread started, which would then be taken for the stepper.
    ``done`` is set when the answer ends (exhausted, closed, failed or dropped).
    """

    __slots__ = ("done", "thread", "started")

    def __init__(self):
        self.done = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.started = False


class Transactional:
    """The hold of one stream and the transaction discipline of its calls (needs ``self.kv``)."""

    def __init__(self):
        self._lock = threading.RLock()  # held for one call, or for one step of an open answer
        self._answer: Optional[OpenAnswer] = None  # the open ask_stream answer (held between its steps)
        self._deferred: dict[threading.Thread, BaseException] = {}  # thread -> what landed after its call committed
        self._closed = False

    def _acquire(self, answer: Optional[OpenAnswer] = None) -> None:
        """Take the stream for one call, or one step of ``answer`` (which then becomes the open answer).

        Waits while another answer is open. Raises what landed after this thread's last commit,
        and RuntimeError for a call made from inside one of the engine's own calls.
        """
        me = threading.current_thread()  # the object: idents of ended threads are reused
        if me in self._deferred:
            raise self._deferred.pop(me)
        if self._lock._is_owned():
            if _inside_a_call(self):
                raise RuntimeError("the engine was called from inside one of its own calls (a streamer's put()?): "
                                   "calls on one stream cannot nest; make the call after this one returns")
            while self._lock._is_owned():  # leaked by a call interrupted between two of its lines
                self._lock.release()
        try:
            self._lock.acquire()
            while self._answer is not None and self._answer is not answer:
                held = self._answer
                if held.thread == me:
                    raise RuntimeError("an ask_stream() answer is still open on this thread: iterate it to the end "
                                       "or close() it before calling the engine again")
                self._lock.release()
                held.done.wait()
                self._lock.acquire()
            if self._closed:
                raise ValueError("this engine was closed (close() or the end of its with-block): make a new one")
            if answer is not None:
                self._answer, answer.thread, answer.started = answer, me, True
        except BaseException:
            if self._lock._is_owned():
                self._lock.release()
            raise

    def _end_answer(self, answer: OpenAnswer) -> None:
        """``answer`` no longer holds the stream (lock-free: also called when an unfinished answer is dropped)."""
        if self._answer is answer:
            self._answer = None
        answer.done.set()

    def _transaction(self, work, *args, answer: Optional[OpenAnswer] = None):
        """Run ``work(*args) -> (txn or None, result)`` under the hold; commit ``txn`` as the very last step.

        Nothing of the library runs after the commit (it also releases the lock, in C), so a call
        that raised has committed nothing. Should an exception land right after the commit anyway
        (an asynchronous ``KeyboardInterrupt`` is raised after a C call returns), the call returns
        normally and the exception is raised by this thread's next call on the engine.
        """
        self._acquire(answer)
        try:
            txn, result = work(*args)
            if txn is not None:
                self.kv.settle(txn)  # a bounded stream evicts here, inside the transaction (may refuse)
        except BaseException:
            if self._lock._is_owned():
                self._lock.release()
            raise
        if txn is None:
            self._lock.release(); return result  # noqa: E702  (nothing to commit)
        try:
            return self.kv.commit(txn, result, then=self._lock.release)
        except BaseException as exc:
            while self._lock._is_owned():
                self._lock.release()
            if self.kv.state is not txn.state:
                raise  # the commit itself refused: nothing was committed
            self._deferred[threading.current_thread()] = exc.with_traceback(None)  # committed: return normally, raise it next call
            return result


def _inside_a_call(engine) -> bool:
    """Whether this thread runs one of ``engine``'s calls besides the one asking (a nested call)."""
    calls, frame = 0, sys._getframe(1)
    while frame is not None:
        if frame.f_code is _TRANSACTION_CODE and frame.f_locals.get("self") is engine:
            calls += 1
        frame = frame.f_back
    return calls > 1


_TRANSACTION_CODE = Transactional._transaction.__code__
