"""What the page's file inputs hand over, as paths: one upload, or a modulation with its gate."""
from __future__ import annotations

from pathlib import Path

from ..run.folder import RunFolder


def upload_path(f) -> str | None:
    """The path of an uploaded file (a path string, or a file object with `.name`); None when nothing was given."""
    return None if not f else str(getattr(f, "name", f))


def _file_format(path: str) -> str:
    """The `format` field of a safetensors file's header ("" when unreadable)."""
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("format", "")
    except Exception:  # noqa: BLE001 - reported when the file is loaded as a modulation
        return ""


def gains_paths(upload) -> tuple[str | None, str | None]:
    """(modulation, gate) from an upload: one file or folder, or several files (the gate told apart by its header).
    A gate.safetensors beside a modulation file, or inside a run folder, comes along."""
    paths = [upload_path(p) for p in (upload if isinstance(upload, (list, tuple)) else [upload]) if upload_path(p)]
    gates = [p for p in paths if Path(p).is_file() and _file_format(p) == "neurontune-gate"]
    mods = [p for p in paths if p not in gates]
    mod = mods[0] if mods else None
    gate = gates[0] if gates else None
    if mod is not None and Path(mod).is_dir():  # a run or export folder: its gains file, and its gate if it has one
        folder = RunFolder(mod)
        mod, gate = str(folder.modulation_path), gate or (str(folder.gate_path) if folder.has(RunFolder.GATE) else None)
    elif mod is not None and gate is None:  # a gains file that sits in a run folder brings that folder's gate
        beside = RunFolder(Path(mod).parent)
        gate = str(beside.gate_path) if Path(mod).name == RunFolder.MODULATION and beside.has(RunFolder.GATE) else None
    return mod, gate
