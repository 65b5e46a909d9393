"""Process pools that stream: results in input order, a bounded number of tasks in flight.

`multiprocessing.Pool.imap` reads its whole input ahead of the workers, so a large corpus would
end up in memory; `ordered_map` submits a new task only as results are taken, keeping at most
`window` batches queued and memory flat.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional


@contextmanager
def worker_pool(workers: int, initializer: Optional[Callable] = None, initargs: tuple = ()):
    """A forked pool of `workers` processes, or None for in-process work when workers <= 1.
    The pool is terminated on exit, also on errors and Ctrl-C."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield None
        return
    pool = multiprocessing.get_context("fork").Pool(workers, initializer, initargs)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def ordered_map(pool, fn: Callable, items: Iterable, window: int = 0) -> Iterator:
    """`fn(item)` for each item, in order; in-process when `pool` is None."""
    if pool is None:
        yield from map(fn, items)
        return
    window = window or 4 * pool._processes
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def batches_by_size(records: Iterable, max_bytes: int = 1 << 20, max_records: int = 256) -> Iterator[list]:
    """Group records (anything with a `.size` in bytes) into lists of about `max_bytes`, at most
    `max_records` each: the unit of work sent to a pool worker."""
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += record.size
        if size >= max_bytes or len(batch) >= max_records:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
