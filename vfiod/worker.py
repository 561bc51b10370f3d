"""Where the broker's slow host work runs: driver unbinds and binds, module
loads, host-critical scans. A GPU takes seconds to unbind and `modprobe` may
take a minute, so the daemon runs them on threads, one job per request, while
its event loop keeps answering everyone else (and feeding the watchdog).

The broker never touches a group another job is changing: it reserves the
group first (vfiod.broker). Jobs write sysfs and the state file only; the
inventory, the leases and the bus objects change on the loop, when a job is
done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

# Rebinding jobs at once; more wait for a thread (each is one request's group
# set, so this many groups move in parallel).
MAX_JOBS = 16


class Worker(Protocol):
    async def run(self, job: Callable[[], T]) -> T:
        """Run ``job`` off the loop; its result or its exception."""
        ...

    def start(
        self, job: Callable[[], T], done: Callable[[T | None, BaseException | None], None]
    ) -> None:
        """Run ``job`` off the loop, then ``done(result, error)`` on the loop."""
        ...

    def on_loop(self, call: Callable[[], None]) -> None:
        """From a job: have the loop run ``call`` (progress announcements)."""
        ...


class InlineWorker:
    """Jobs run at once, in the caller: a broker without an event loop (the
    policy checker, unit tests), where nobody else is waiting."""

    async def run(self, job: Callable[[], T]) -> T:
        return job()

    def start(
        self, job: Callable[[], T], done: Callable[[T | None, BaseException | None], None]
    ) -> None:
        try:
            result = job()
        except Exception as e:  # handed to done(), as the threaded worker does
            done(None, e)
            return
        done(result, None)

    def on_loop(self, call: Callable[[], None]) -> None:
        call()


class ThreadWorker:
    """Jobs on a pool of threads; results come back on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_jobs: int = MAX_JOBS) -> None:
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(max_jobs, thread_name_prefix="vfiod-job")

    async def run(self, job: Callable[[], T]) -> T:
        return await self.loop.run_in_executor(self.pool, job)

    def start(
        self, job: Callable[[], T], done: Callable[[T | None, BaseException | None], None]
    ) -> None:
        future = self.loop.run_in_executor(self.pool, job)

        def finished(f: asyncio.Future[T]) -> None:
            error = f.exception() if not f.cancelled() else asyncio.CancelledError()
            done(None if error is not None else f.result(), error)

        future.add_done_callback(finished)

    def on_loop(self, call: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(call)

    def close(self) -> None:
        """Wait for running jobs (a sysfs write cannot be interrupted); queued
        ones are dropped."""
        self.pool.shutdown(wait=True, cancel_futures=True)
