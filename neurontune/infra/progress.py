"""Progress callbacks and cancellation, shared by every long job (attribution, training, evaluation, sweeps)."""
from __future__ import annotations

import threading
from typing import Callable

Progress = Callable[[int, int, str], None]  # progress(done, total, stage)


class Cancelled(RuntimeError):
    """A long job was cancelled through its cancel flag; nothing partial was stored."""


def check_cancel(cancel: threading.Event | None, what: str = "The job") -> None:
    """Raise `Cancelled` once the flag is set: long loops call this between batches."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} was cancelled.")
