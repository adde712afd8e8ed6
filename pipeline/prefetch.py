"""Work done ahead of its consumer: an ordered map over a thread pool with a bounded look-ahead.

Shard building reads and checks the next images while one is written; SinCUT cuts the next batches
while one trains. The look-ahead bounds what waits in memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int,
                name: str = "prefetch") -> Iterator[R]:
    """``map(fn, items)`` with ``fn`` running in ``workers`` threads (named ``name``), results in input
    order, at most ``ahead`` of them running or waiting at a time. ``workers`` 0: in this thread, one
    at a time."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: deque[Future[R]] = deque()
        todo = iter(items)
        for item in todo:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            item = next(todo, _END)
            if item is not _END:
                pending.append(pool.submit(fn, item))
            yield result


_END = object()
