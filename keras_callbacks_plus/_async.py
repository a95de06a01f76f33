"""One background writer: runs one job at a time and hands failures back to the caller."""

from __future__ import annotations

import threading
from typing import Callable


class AsyncWriter:
    """Runs jobs on one background thread, one at a time.

    `submit()` first waits for the job before it, so at most one job is in
    flight and jobs finish in order. An exception raised by a job is kept
    and re-raised on the caller's thread exactly once: by the next
    `submit()`, `wait_until_finished()` or `check()`.

    Args:
        name: the thread's name, for debugging.
        enabled: False runs every job synchronously in `submit()` (still on
            a thread of its own: see `run_outside_scopes`).
    """

    def __init__(self, name: str = "keras_callbacks_plus-writer", enabled: bool = True):
        self.name = name
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Runs `job` in the background after the previous job finished."""
        self.wait_until_finished()
        if not self.enabled:
            run_outside_scopes(job)
            return
        self._thread = threading.Thread(target=self._run, args=(job,), name=self.name, daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as error:  # handed to the training thread
            self._error = error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def failed(self) -> bool:
        """Whether a finished job failed and its error was not raised yet."""
        return self._error is not None and not self.busy

    def wait_until_finished(self) -> None:
        """Blocks until the job in flight is done; re-raises its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Re-raises a failure of a finished job, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error


def run_outside_scopes(fn: Callable[[], None]) -> None:
    """Runs `fn` on a new thread and waits for it; re-raises its failure here.

    TensorFlow strategy scopes and Keras distribution scopes are thread-local:
    a new thread has none, so models built there are plain single-device
    models even while the caller trains a twin (in several processes, a
    variable made in a scope would start a collective the other processes
    never join).
    """
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as error:  # handed back to the caller
            errors.append(error)

    thread = threading.Thread(target=run, name="keras_callbacks_plus-outside-scopes")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
