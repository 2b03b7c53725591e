"""The worker that owns the model: it gathers waiting rows into batches and runs them through
`Engine.stream`, with rows joining and leaving between decode steps (continuous batching).

Batching rule: a batch shares the engine options that are one per call (temperature, top_p, top_k,
max_images, the image settings), so rows are grouped by `Job.key`, which is those options; seed,
prompt, forced image and token limit are per row. After the first row of a batch arrives the
worker waits `window` seconds for more of its key (up to `max_batch`), then starts. While it runs,
waiting rows of the same key join at the next decode step as long as no row of another key waits
before them (so no key starves), and rows leave when they end, are cancelled (client gone, stop
string seen) or the server closes. Events go back through each job's `deliver`, called on the
worker thread; the caller hands them to its event loop.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmgen.events import ImageDone, ImageStart, RowDone, Token
from mmgen.generation import Engine, GenerationOptions, Join

log = logging.getLogger("mmgen.serve")


@dataclass(eq=False)
class Job:
    """One row of work: a rendered prompt (engine segments) with its options, seed, forced image and
    token limit. `deliver` receives the row's Token, ImageStart, ImageDone, RowDone events, or a `Failed`."""

    prompt: list
    options: GenerationOptions
    seed: int
    force_image: bool
    deliver: Callable[[Any], None]
    key: str = field(init=False)

    def __post_init__(self) -> None:  # rows batch together when the per-call options are equal
        self.key = repr([(f.name, getattr(self.options, f.name)) for f in dataclasses.fields(self.options)
                         if f.name != "max_new_tokens"])

    def join(self) -> Join:
        return Join(self.prompt, self.seed, self.force_image, self.options.max_new_tokens)


@dataclass
class Failed:
    """The row could not be finished: answered with this HTTP status and message."""

    status: int
    message: str


class Overloaded(Exception):
    """The queue has no room (answered 503)."""


@dataclass
class Stats:
    """Counters since start: batches run, rows started (joined: those that joined a running batch),
    rows cancelled, the largest batch; `running` and `waiting` rows now."""

    batches: int = 0
    rows: int = 0
    joined: int = 0
    cancelled: int = 0
    max_rows: int = 0
    running: int = 0
    waiting: int = 0


class Batcher:
    """Runs jobs on one worker thread.

    Args:
        engine: the model's engine (only the worker thread touches it).
        stop: ids that end a row besides <eos> (the chat template's <|end|>).
        window: seconds to gather rows after the first one of a batch.
        max_batch: rows in a batch at most (1: one at a time).
        max_queue: rows waiting at most; `submit` raises `Overloaded` beyond.
    """

    def __init__(self, engine: Engine, stop: Sequence[int], window: float, max_batch: int, max_queue: int):
        self.engine, self.stop = engine, list(stop)
        self.window, self.max_batch, self.max_queue = window, max_batch, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._cancel: set[Job] = set()
        self._closing = False
        self._stats = Stats()
        self._thread = threading.Thread(target=self._work, name="mmgen-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> Stats:
        with self._cond:
            return dataclasses.replace(self._stats, running=len(self._running), waiting=len(self._waiting))

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue the jobs (all or none); raises `Overloaded` when the queue is full or closing."""
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise Overloaded(f"the server is busy: {len(self._waiting)} rows wait for the model (--max-queue "
                                 f"{self.max_queue}); retry later")
            self._waiting.extend(jobs)
            self._cond.notify_all()

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Drop waiting jobs; end running ones at the next decode step. Finished jobs are ignored."""
        with self._cond:
            for job in jobs:
                if job in self._waiting:
                    self._waiting.remove(job)
                    self._stats.cancelled += 1
                elif job in self._running:
                    self._cancel.add(job)

    def close(self, timeout: float = 10.0) -> None:
        """Stop: waiting and running jobs get `Failed(503)`, running rows are cancelled, the worker ends."""
        with self._cond:
            self._closing = True
            for job in [*self._waiting, *self._running]:
                job.deliver(Failed(503, "the server is shutting down; retry on another instance or later"))
            self._waiting.clear()
            self._cancel |= self._running
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        while (jobs := self._gather()) is not None:
            self._run(jobs)

    def _gather(self) -> list[Job] | None:
        """Wait for a first job, then up to `window` for more of its key; None when closing."""
        with self._cond:
            while True:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return None
                key = self._waiting[0].key
                deadline = time.monotonic() + self.window
                while sum(j.key == key for j in self._waiting) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                jobs = [] if self._closing else self._take(key, self.max_batch, in_order=False)
                if jobs:  # none if they were all cancelled while we waited
                    self._stats.batches += 1
                    return jobs

    def _take(self, key: str, room: int, in_order: bool) -> list[Job]:
        """Move up to `room` waiting jobs of `key` to running (lock held); `in_order`: stop at the
        first job of another key, so that joining never overtakes it."""
        jobs = []
        for job in list(self._waiting):
            if len(jobs) >= room or (in_order and job.key != key):
                break
            if job.key == key:
                jobs.append(job)
                self._waiting.remove(job)
        self._running.update(jobs)
        self._stats.rows += len(jobs)
        self._stats.max_rows = max(self._stats.max_rows, len(self._running))
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        """One engine call: route each event to its row's job until every row has ended."""
        rows = dict(enumerate(jobs))
        feed = _Feed(self, jobs[0].key, rows)
        try:
            for event in self.engine.stream(
                    [j.prompt for j in jobs], jobs[0].options, seed=[j.seed for j in jobs],
                    force_image=[j.force_image for j in jobs], stop=self.stop,
                    max_new_tokens=[j.options.max_new_tokens for j in jobs], feed=feed):
                self._route(event, rows)
        except Exception as e:  # a bug, not bad input (requests are checked before they queue): keep serving
            log.exception("a batch of %d rows failed", len(rows))
            for job in rows.values():
                job.deliver(Failed(500, f"internal error while generating ({type(e).__name__}); see the server log"))
        finally:
            with self._cond:
                self._running.difference_update(rows.values())
                self._cancel.difference_update(rows.values())

    def _route(self, event: Any, rows: dict[int, Job]) -> None:
        if isinstance(event, ImageStart):
            for row in event.rows:
                rows[row].deliver(ImageStart([row]))
        elif isinstance(event, (Token, ImageDone)):
            rows[event.row].deliver(event)
        elif isinstance(event, RowDone):
            job = rows.pop(event.row)
            job.deliver(event)
            with self._cond:
                self._running.discard(job)
                if job in self._cancel:
                    self._cancel.discard(job)
                    self._stats.cancelled += 1


class _Feed:
    """The engine's view of the queue during one batch: cancelled rows out, same-key rows in."""

    def __init__(self, batcher: Batcher, key: str, rows: dict[int, Job]):
        self.batcher, self.key, self.rows = batcher, key, rows
        self.next_row = len(rows)  # the engine numbers joined rows in order

    def cancelled(self) -> list[int]:
        with self.batcher._cond:
            return [row for row, job in self.rows.items() if job in self.batcher._cancel]

    def joins(self, running: int) -> list[Join]:
        b = self.batcher
        with b._cond:
            if b._closing or running >= b.max_batch:
                return []
            jobs = b._take(self.key, b.max_batch - running, in_order=True)
            b._stats.joined += len(jobs)
        for job in jobs:
            self.rows[self.next_row] = job
            self.next_row += 1
        return [job.join() for job in jobs]
