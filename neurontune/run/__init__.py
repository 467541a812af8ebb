"""A run end to end: the steps that fill a run folder (`RunFolder`, the one owner of its file names), the
evaluation of a run, the threshold sweep and the export of a tuned checkpoint. The CLI and the studio call here."""
from .folder import RunFolder

__all__ = ["RunFolder"]
