"""Overlap teacher requests with training: a background event loop owns the async client.

The training loop calls :meth:`TeacherPrefetcher.submit` for batch n+1 before it
trains on batch n, and blocks on the future only when it needs the rows. At most
``depth`` requests are in flight; a further submit waits for a slot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Closable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=Closable)


class TeacherPrefetcher(Generic[C]):
    """Owns one client (a teacher client, or the router over named teachers) on its background loop."""

    def __init__(self, client_factory: Callable[[], C], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-prefetch", daemon=True)
        self._thread.start()
        self._slots = threading.BoundedSemaphore(depth)
        self.depth = depth
        self.client: C = self.run(self._make(client_factory))

    @staticmethod
    async def _make(factory: Callable[[], C]) -> C:
        return factory()  # on the loop: the client's connection pool belongs to it

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the background loop and wait for it (set-up calls, handshakes)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def submit(self, fn: Callable[[C], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Start ``fn(client)`` now; the returned future resolves to its result or raises its error."""
        self._slots.acquire()
        fut = asyncio.run_coroutine_threadsafe(fn(self.client), self._loop)  # type: ignore[arg-type]
        fut.add_done_callback(lambda _: self._slots.release())
        return fut

    async def _shutdown(self) -> None:
        """Cancel requests nobody will read (prefetched past the last step), then close the client."""
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.client.aclose()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TeacherPrefetcher[C]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
