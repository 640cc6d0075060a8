"""The asyncio event loop each hub or client runs in one background thread.

The engine calls blocking methods from its own thread; they hand work to the loop with
`call` (call_soon_threadsafe, no future) or `run` (run_coroutine_threadsafe, waits for the
result). No thread is created per call.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, Callable

log = logging.getLogger(__name__)


class LoopThread:
    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run `coro` on the loop and wait for its result (not from the loop thread)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:  # TimeoutError itself from 3.11 on
            fut.cancel()
            raise

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule `fn(*args)` on the loop; returns at once."""
        self.loop.call_soon_threadsafe(fn, *args)

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 5.0, last: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run `last` (a goodbye: close connections, stop serving; its failure is only logged),
        then cancel every task, stop the loop and join the thread. Idempotent."""
        if last is not None and self._thread.is_alive():
            try:
                self.run(last, timeout)
            except Exception as e:  # noqa: BLE001 - best effort on shutdown
                log.debug("%s shutdown: %s", self._thread.name, e)
        elif last is not None:
            last.close()  # never awaited: the loop is gone
        if not self._thread.is_alive():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_all(), timeout)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
