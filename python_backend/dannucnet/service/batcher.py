"""Dynamic micro-batching: one model per device, shared by every concurrent request.

Request threads submit work items (image tiles or whole windows) and block; one
worker thread owns the model, gathers whatever is queued (up to ``max_batch``
items of the same shape, waiting at most ``max_wait_s`` for more, as Triton's
dynamic batcher does) and runs them as one batch. A bounded queue turns
overload into RESOURCE_EXHAUSTED instead of unbounded memory and latency, and
items whose caller has gone (cancelled, deadline passed) are dropped unrun.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import numpy as np

from dannucnet.protocols import Cancel
from dannucnet.service.calls import Call
from dannucnet.service.status import ServiceError

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]]


@dataclass
class _Item:
    array: np.ndarray
    cancel: Cancel | None  # the submitting request's: true once nobody waits for the result
    future: Future = field(default_factory=Future)


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    dropped: int = 0
    rejected: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0


class MicroBatcher:
    """Serialises model calls on one worker thread and batches them across requests."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int = 8,
        max_queue: int = 256,
        max_wait_s: float = 0.002,
        name: str = "model",
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._pending = 0  # items submitted and not yet finished (queued, gathered or running)
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self.stats = BatcherStats()
        self._thread = threading.Thread(target=self._loop, name=f"dannucnet-batcher-{name}", daemon=True)
        self._thread.start()

    # ---- request side -------------------------------------------------
    def submit_many(self, arrays: Sequence[np.ndarray], cancel: Cancel | None = None) -> list[np.ndarray]:
        """Run ``arrays`` through the model (batched with other requests' items).

        Once ``cancel()`` is true the items not yet run are dropped and the wait ends with the
        call's status (a :class:`~dannucnet.service.calls.Call` knows CANCELLED from
        DEADLINE_EXCEEDED; any other cancel callable means CANCELLED).
        """
        if self._stop.is_set():
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another server")
        with self._pending_lock:
            if self._pending + len(arrays) > self.max_queue:
                self.stats.rejected += 1
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the server is busy (its model queue is full); retry in a moment",
                )
            self._pending += len(arrays)
        items = [_Item(array, cancel) for array in arrays]
        for item in items:
            item.future.add_done_callback(self._release)
            self._queue.put_nowait(item)
        return [self._wait(item) for item in items]

    @property
    def pending(self) -> int:
        """Items submitted and not yet finished (queued, gathered or running): what ``max_queue`` bounds."""
        with self._pending_lock:
            return self._pending

    def submit(self, array: np.ndarray, cancel: Cancel | None = None) -> np.ndarray:
        return self.submit_many([array], cancel)[0]

    def _release(self, _future: Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _wait(self, item: _Item) -> np.ndarray:
        while True:
            try:
                return item.future.result(timeout=0.05)
            except TimeoutError:
                if item.cancel is not None and item.cancel():
                    item.future.cancel()  # the worker skips it if it has not started
                    raise _stopped(item.cancel) from None

    # ---- worker side --------------------------------------------------
    def _take_batch(self) -> list[_Item]:
        while True:
            try:
                first = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set():
                    return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch * 4:  # gather a little more, then group by shape
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while True:
            items = self._take_batch()
            if not items:
                return
            live = []
            for item in items:
                if item.future.cancelled() or (item.cancel is not None and item.cancel()):
                    item.future.cancel()
                    self.stats.dropped += 1
                elif item.future.set_running_or_notify_cancel():
                    live.append(item)
            groups: dict[tuple, list[_Item]] = defaultdict(list)
            for item in live:
                groups[(item.array.shape, item.array.dtype.str)].append(item)
            for group in groups.values():
                for start in range(0, len(group), self.max_batch):
                    self._run(group[start : start + self.max_batch])

    def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._run_batch([item.array for item in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(batch)} inputs")
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            for item in batch:
                item.future.set_exception(exc)
            return
        finally:
            self.stats.busy_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for item, out in zip(batch, outputs):
            item.future.set_result(out)

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued work, then stop the worker."""
        self._stop.set()
        self._thread.join(timeout)


def _stopped(cancel: Cancel) -> ServiceError:
    """The status a request's wait ends with once ``cancel()`` is true."""
    if isinstance(cancel, Call):
        cancel.check()  # raises CANCELLED or DEADLINE_EXCEEDED, whichever ended the call
    return ServiceError(grpc.StatusCode.CANCELLED, "the client cancelled the request")
