"""The state of one client call (deadline, cancellation), independent of transport.

The servicer sets the current call in a context variable so that code deep in
the pipeline (the batched predictor) can skip work nobody waits for any more
without every function growing a ``context`` parameter.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from dannucnet.service.status import ServiceError


class Call:
    """A client call: alive until cancelled, disconnected or past its deadline."""

    def __init__(self, deadline: float | None = None, is_active: Callable[[], bool] | None = None) -> None:
        self.deadline = deadline  # time.monotonic() value, or None
        self._is_active = is_active
        self._cancelled = threading.Event()
        self.admitted = False  # holds a pending-request slot (the gateway takes it before reading the body)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        if self._cancelled.is_set():
            return True
        if self._is_active is not None and not self._is_active():
            self._cancelled.set()
            return True
        return False

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def alive(self) -> bool:
        return not self.cancelled and not self.expired

    def check(self) -> None:
        """Raise the status that ends this call if it should stop."""
        if self.cancelled:
            raise ServiceError(grpc.StatusCode.CANCELLED, "the client cancelled the request")
        if self.expired:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it finished")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the call was cancelled meanwhile."""
        return self._cancelled.wait(seconds)


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("dannucnet_call", default=None)


def current_call() -> Call | None:
    return _current.get()


@contextlib.contextmanager
def bind(call: Call) -> Iterator[Call]:
    token = _current.set(call)
    try:
        yield call
    finally:
        _current.reset(token)
