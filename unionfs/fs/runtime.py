"""How request handlers wait: the two ways a session runs them.

Handlers are coroutines, and wait at two kinds of points only: a long blocking call (a big copy,
removing a tree) that other requests must not queue behind, and a copy-up of the same entry that
another request has under way. Everything between two such points runs as one step.

- ``TrioRuntime``: pyfuse3's trio loop runs the handlers as tasks; a blocking call goes to a worker
  thread, and a waiter parks on a trio Event.
- ``ThreadRuntime``: the Cython session runs each request to the end on one of its threads, holding
  ``lock``. A blocking call releases the lock for its duration, and a waiter parks on a condition
  of the same lock; either way ``on_wait`` first tells the session, which has another thread read
  requests meanwhile. Handlers never suspend.

Either way, what a handler sees between two waiting points is the same.
"""

import threading


class TrioRuntime:
    def __init__(self):
        import trio
        self._trio = trio

    async def run_blocking(self, fn, *args):
        return await self._trio.to_thread.run_sync(fn, *args)

    def event(self):
        return self._trio.Event()


class ThreadRuntime:
    def __init__(self):
        self.lock = threading.Lock()
        # Called (holding the lock) when a handler is about to wait with the lock released: the
        # session makes sure another thread reads requests meanwhile.
        self.on_wait = None

    def _let_go(self):
        if self.on_wait is not None:
            self.on_wait()
        self.lock.release()

    async def run_blocking(self, fn, *args):
        self._let_go()
        try:
            return fn(*args)
        finally:
            self.lock.acquire()

    def event(self):
        return _LockedEvent(self)


class _LockedEvent:
    """An event set and waited for by holders of the runtime's lock; waiting lets go of it."""

    __slots__ = ("_rt", "_cond", "_set")

    def __init__(self, rt):
        self._rt = rt
        self._cond = threading.Condition(rt.lock)
        self._set = False

    def set(self):
        self._set = True
        self._cond.notify_all()

    async def wait(self):
        while not self._set:
            if self._rt.on_wait is not None:
                self._rt.on_wait()
            self._cond.wait()
