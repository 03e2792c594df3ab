"""The state of one client call (deadline, cancellation), independent of transport.

A :class:`Call` is also the pipeline's cancel callable (``dannucnet.protocols.Cancel``): the
servicer hands it down as ``cancel=call`` and the pipeline, the window loop and the
micro-batcher ask it between batches whether anyone still waits for the work (the one
way cancellation travels; ``dannucnet.protocols`` says why not a context variable).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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

    def __call__(self) -> bool:
        """True once the work should stop (cancelled, disconnected or past the deadline): a ``Cancel``."""
        return not self.alive()

    def check(self) -> None:
        """Raise the status that ends this call if it should stop.

        The deadline is asked first: when it passes, gRPC also marks the call inactive,
        and that is a deadline, not a client's cancel.
        """
        if self.expired:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it finished")
        if self.cancelled:
            raise ServiceError(grpc.StatusCode.CANCELLED, "the client cancelled the request")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the call was cancelled meanwhile."""
        return self._cancelled.wait(seconds)

