"""Off the training thread: :class:`BackgroundTask` runs one callable on a worker thread (inside a side
CUDA stream when the work is on a GPU), for the asynchronous refresh (``S2DConfig.async_lead``).

Depends on torch only.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = ["BackgroundTask"]


class BackgroundTask:
    """Run one callable at a time on a worker thread, overlapping the training step.

    On CUDA the callable runs inside a side stream that first waits for the work already queued on
    the caller's stream (so the inputs it reads are ready); the worker waits for the side stream to
    finish, so when :meth:`result` returns the outputs are complete (the caller's stream also waits on
    the side stream's event). Exceptions are re-raised by :meth:`result`.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._thread: threading.Thread | None = None
        self._out: object = None
        self._err: BaseException | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._event: torch.cuda.Event | None = None

    @property
    def pending(self) -> bool:
        """True between :meth:`submit` and :meth:`result`."""
        return self._thread is not None

    def submit(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Start ``fn(*args, **kwargs)`` in the background; one task at a time."""
        if self._thread is not None:
            raise RuntimeError("BackgroundTask.submit: a task is already running; call result() first")
        self._out, self._err = None, None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            self._event = torch.cuda.Event()
        # not a daemon: interpreter exit waits for the work instead of killing it mid-kernel (abort)
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=False)
        self._thread.start()

    def _run(self, fn: Callable[..., object], args: tuple, kwargs: dict) -> None:
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    self._out = fn(*args, **kwargs)
                    self._event.record(self._stream)
                # Block this worker (not training) until the side stream is done, so the inputs,
                # allocated on the caller's stream, are not freed and reused while still being read.
                self._event.synchronize()
            else:
                self._out = fn(*args, **kwargs)
        except BaseException as err:  # re-raised on the caller's thread
            self._err = err

    def result(self) -> object:
        """Wait for the task and return its value (re-raising its exception)."""
        if self._thread is None:
            raise RuntimeError("BackgroundTask.result: nothing was submitted")
        self._thread.join()
        self._thread = None
        if self._err is not None:
            err, self._err = self._err, None
            raise err
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
        out, self._out = self._out, None
        return out
