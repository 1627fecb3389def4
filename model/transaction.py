"""Every public call of an engine is a transaction under the stream's lock.

The engine's calls run ``work(*args) -> (txn or None, result)`` through ``_transaction``: the
work builds a ``Transaction`` (a working copy of the stream's head) and the commit, one
assignment that also releases the lock, is the call's very last step. A call that raised,
whatever it raised (``KeyboardInterrupt`` and out-of-memory included) and wherever, has
committed nothing. Used by ``VideoStreamInference`` (and ``AnswerStream``, which holds the
lock across its pieces).
"""
from __future__ import annotations

import threading


class Transactional:
    """The lock of one stream and the transaction discipline of its calls (needs ``self.kv``)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._open_stream = False  # an ask_stream() answer holds the lock between its pieces

    def _acquire(self) -> None:
        """Take the stream's lock. Public calls never nest, so a lock this thread already holds was
        leaked by a call interrupted between two of its last lines (release it first), or belongs to
        an open ``ask_stream`` answer on this thread (an error: it would deadlock)."""
        while self._lock._is_owned():
            if self._open_stream:
                raise RuntimeError("an ask_stream() answer is still open on this thread: iterate it to the end or "
                                   "close() it before calling the engine again")
            self._lock.release()
        self._lock.acquire()

    def _transaction(self, work, *args):
        """Run ``work(*args) -> (txn or None, result)`` under the lock; commit ``txn`` as the very last step.

        Nothing of the library runs after the commit (it also releases the lock, in C), so a call
        that raised, whatever it raised and wherever, has committed nothing.
        """
        self._acquire()
        try:
            txn, result = work(*args)
            if txn is not None:
                self.kv.settle(txn)  # a bounded stream evicts here, inside the transaction (may refuse)
        except BaseException:
            self._lock.release()
            raise
        if txn is None:
            self._lock.release(); return result  # noqa: E702  (nothing to commit)
        return self.kv.commit(txn, result, then=self._lock.release)
