"""The one report protocol of every long step (attribution, training, gate fitting, evaluation, sweep, export,
separability, the direction search): how far it is, a training step's log entry, a message for the user, and
whether it should stop. The CLI's bars and the studio's job runner implement it; `SILENT` is the default."""
from __future__ import annotations

import threading


class Cancelled(RuntimeError):
    """A long job was cancelled through its reporter; nothing partial was stored."""


class Reporter:
    """What a long step tells whoever runs it, and how it learns that it should stop. This base class says
    nothing; it is cancelled once `cancel` (an Event, when given) is set. Subclasses override what they show."""

    def __init__(self, cancel: threading.Event | None = None):
        self.cancel = cancel

    def phase(self, name: str, total: int | None = None) -> None:
        """A new phase of the work begins (the CLI opens a bar for it), of `total` units when known."""

    def progress(self, done: int, total: int, stage: str = "") -> None:
        """`done` of `total` units of the current phase are finished; `stage` says what is being done."""

    def step(self, entry: dict) -> None:
        """One training step's log entry: step, task, loss and its terms, validation loss when measured."""

    def say(self, message: str) -> None:
        """A message for the user (may span lines)."""

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def check(self, what: str = "The job") -> None:
        """Raise `Cancelled` once the job was asked to stop: long loops call this between batches."""
        if self.cancelled:
            raise Cancelled(f"{what} was cancelled.")

    def within(self, prefix: str) -> "Reporter":
        """The same reporter with every stage and phase name prefixed (one part of a larger job)."""
        return _Relay(self, prefix=prefix)

    def muted(self) -> "Reporter":
        """A reporter that says nothing but stops when this one does (inner work whose counts would confuse a bar)."""
        return _Relay(self, quiet=True)


SILENT = Reporter()  # the default of every library call: says nothing, never cancelled


class _Relay(Reporter):
    def __init__(self, inner: Reporter, prefix: str = "", quiet: bool = False):
        super().__init__()
        self.inner, self.prefix, self.quiet = inner, prefix, quiet

    @property
    def cancelled(self) -> bool:
        return self.inner.cancelled

    def phase(self, name: str, total: int | None = None) -> None:
        if not self.quiet:
            self.inner.phase(self.prefix + name, total)

    def progress(self, done: int, total: int, stage: str = "") -> None:
        if not self.quiet:
            self.inner.progress(done, total, self.prefix + stage)

    def step(self, entry: dict) -> None:
        if not self.quiet:
            self.inner.step(entry)

    def say(self, message: str) -> None:
        if not self.quiet:
            self.inner.say(message)
