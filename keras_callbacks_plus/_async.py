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
        enabled: False runs every job synchronously in `submit()`.
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
            job()
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
