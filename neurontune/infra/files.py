"""Every file the project writes goes through here: written under a hidden temp name and renamed into place,
so a reader never sees half a file and a crash never leaves a valid-looking one.

Plain files (`write_file(..., checksum=False)`, `write_text`, `write_jsonl`: run folders, job status, gains)
are just atomic. Cache entries (the default, `checksum=True`) also store their SHA-256 and size alongside and are
verified on every read: a missing, truncated, corrupted or half-written entry is a miss (logged once), never
trusted and never a crash; the caller recomputes it and writes it again.

A file entry `NAME` has a sidecar `NAME.sha256` (`{"sha256": ..., "size": ...}`): the old sidecar is removed
before the new data is renamed in and the new one renamed in last, so a crash at any point leaves either the
old entry, or data with no sidecar (a miss). A folder entry holds a manifest `.complete.json` (every file's
size and SHA-256), written inside the temp folder before the folder is renamed in. Temp names are hidden
(`.NAME.tmp-PID-...`); those of dead processes are removed by the next write of the same entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from .processes import pid_alive

log = logging.getLogger(__name__)

SIDECAR = ".sha256"
MANIFEST = ".complete.json"
_CHUNK = 1 << 20
_warned: set[tuple] = set()
_warned_lock = threading.Lock()


class FolderExists(FileExistsError):
    """`write_folder(..., overwrite=False)` found the folder there when the new one was ready; it was kept."""


def default_cache_dir() -> Path:
    """Where models, attribution results and job status are cached: $NEURONTUNE_CACHE or ~/.cache/neurontune."""
    return Path(os.environ.get("NEURONTUNE_CACHE", Path.home() / ".cache" / "neurontune"))


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def _tmp(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `path`: `.NAME.tmp-PID-...` for what is being written (removed once its writer is
    gone), `.NAME.old-PID-...` for an entry set aside while its replacement moves in (never removed unasked)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:6]}")


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), None, None)


def warn_bad(path: Path, why: str, what: str = "cache entry") -> None:
    """Log that an entry is bad and will be recomputed, once per version of the file (a poll loop stays quiet)."""
    key = _stat_key(path) + (why,)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("Ignoring bad %s %s (%s); it is recomputed, never trusted.", what, path, why)


def file_digest(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-")


def clean_temps(path: str | Path, *, whole_folder: bool = False) -> list[Path]:
    """Remove temp files/folders of `path` (and of its sidecar) left by processes that are gone; with
    `whole_folder`, those of every entry in the folder `path`."""
    path = Path(path)
    folder = path if whole_folder else path.parent
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m is None or not (whole_folder or m.group("name") in (path.name, path.name + SIDECAR)):
            continue
        if int(m.group("pid")) == os.getpid() or pid_alive(int(m.group("pid"))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


# -- files ----------------------------------------------------------------------------------------
def write_file(path: str | Path, fill: Callable[[Path], Any], *, checksum: bool = True) -> Path:
    """Write `path` through `fill(temp_path)` and rename it into place. With `checksum` (cache entries) a
    sidecar with its SHA-256 and size is published last, so the entry verifies only once it is whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temps(path)
    tmp, side, side_tmp = _tmp(path), sidecar(path), _tmp(sidecar(path))
    try:
        fill(tmp)
        _fsync(tmp)
        if checksum:
            sha, size = file_digest(tmp)
            side_tmp.write_text(json.dumps({"sha256": sha, "size": size}), encoding="utf-8")
        side.unlink(missing_ok=True)  # the old entry stops verifying before its data is replaced
        os.replace(tmp, path)
        if checksum:
            os.replace(side_tmp, side)  # last: only now does the new entry verify
    except BaseException:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes, *, checksum: bool = True) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data), checksum=checksum)


def write_json(path: str | Path, obj: Any, *, checksum: bool = True, indent: int | None = None) -> Path:
    text = json.dumps(obj, indent=indent, default=str) + ("\n" if indent is not None else "")
    return write_bytes(path, text.encode("utf-8"), checksum=checksum)


def write_text(path: str | Path, text: str, *, checksum: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), checksum=checksum)


def write_jsonl(path: str | Path, rows: Iterable[dict], *, checksum: bool = False) -> Path:
    """One JSON object per line (non-ASCII kept as is)."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), checksum=checksum)


def _expected(path: Path, what: str) -> tuple[str, int] | None:
    try:
        meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
        return str(meta["sha256"]), int(meta["size"])
    except FileNotFoundError:
        warn_bad(path, "no checksum: half-written, or written before checksums", what)
    except (OSError, ValueError, KeyError, TypeError):
        warn_bad(path, "unreadable checksum file", what)
    return None


def read_bytes(path: str | Path, what: str = "cache entry") -> bytes | None:
    """The entry's content when it verifies; None when it is missing (silently) or bad (with a warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    expected = _expected(path, what)
    if expected is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        warn_bad(path, f"unreadable: {exc}", what)
        return None
    if len(data) != expected[1]:
        warn_bad(path, f"size {len(data)} bytes, expected {expected[1]}: truncated or overwritten", what)
        return None
    if hashlib.sha256(data).hexdigest() != expected[0]:
        warn_bad(path, "checksum mismatch: corrupted", what)
        return None
    return data


def read_json(path: str | Path, what: str = "cache entry") -> Any | None:
    data = read_bytes(path, what)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:
        warn_bad(Path(path), f"not JSON: {exc}", what)
        return None


def verify_file(path: str | Path, what: str = "cache entry") -> bool:
    """True when the entry exists and matches its sidecar (streamed: fine for large files)."""
    path = Path(path)
    if not path.is_file():
        return False
    expected = _expected(path, what)
    if expected is None:
        return False
    try:
        actual = file_digest(path)
    except OSError as exc:
        warn_bad(path, f"unreadable: {exc}", what)
        return False
    if actual[1] != expected[1]:
        warn_bad(path, f"size {actual[1]} bytes, expected {expected[1]}: truncated or overwritten", what)
        return False
    if actual[0] != expected[0]:
        warn_bad(path, "checksum mismatch: corrupted", what)
        return False
    return True


# -- folder entries -------------------------------------------------------------------------------
def _manifest(folder: Path) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            sha, size = file_digest(p)
            files[p.relative_to(folder).as_posix()] = {"sha256": sha, "size": size}
    return {"files": files}


def write_folder(path: str | Path, fill: Callable[[Path], Any], *, manifest: bool = True, overwrite: bool = True) -> Path:
    """Build the folder `path` in a temp folder through `fill(temp_folder)` (with `manifest`: add a manifest of
    every file's size and SHA-256, checked by `verify_folder`), then rename it into place. An entry it replaces
    is moved aside first, put back if the rename fails, and deleted after; with `overwrite=False` an entry that
    exists when the new one is ready is kept and FolderExists raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temps(path)
    tmp, old, published = _tmp(path), None, False
    tmp.mkdir()
    try:
        fill(tmp)
        if manifest:
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp)), encoding="utf-8")
            _fsync(tmp / MANIFEST)
        for attempt in range(3):
            if path.exists():
                if not overwrite:
                    raise FolderExists(f"{path} exists.")
                old = _tmp(path, "old")
                try:
                    os.rename(path, old)
                except FileNotFoundError:  # another process moved it first
                    old = None
            try:
                os.rename(tmp, path)
                published = True
                break
            except OSError:
                if old is not None and not path.exists():  # never lose the previous entry
                    os.rename(old, path)
                    old = None
                if manifest and verify_folder(path):  # another process published a good entry meanwhile: keep it
                    shutil.rmtree(tmp, ignore_errors=True)
                    break
                if attempt == 2:
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and published:  # only once the new entry is in place
            shutil.rmtree(old, ignore_errors=True)
    return path


def verify_folder(path: str | Path, what: str = "cache folder") -> bool:
    """True when the folder has a manifest and every file in it has the recorded size and SHA-256."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        warn_bad(path, f"no {MANIFEST}: half-written, or written before manifests", what)
        return False
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict) or not files:  # unparsable, or not a non-empty {name: record} map
        warn_bad(path, f"unreadable {MANIFEST}", what)
        return False
    for rel, expected in files.items():
        p = path / rel
        try:
            if p.stat().st_size != expected["size"]:
                warn_bad(path, f"{rel}: size {p.stat().st_size} bytes, expected {expected['size']}", what)
                return False
            if file_digest(p)[0] != expected["sha256"]:
                warn_bad(path, f"{rel}: checksum mismatch", what)
                return False
        except (OSError, KeyError, TypeError) as exc:
            warn_bad(path, f"{rel}: {exc}", what)
            return False
    return True


# -- JSON records with an embedded checksum (job status files) -------------------------------------
def _json_checksum(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def with_checksum(obj: dict) -> dict:
    """`obj` plus a `checksum` field over the rest (round-trips through JSON unchanged)."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return {**body, "checksum": _json_checksum(json.loads(json.dumps(body, default=str)))}


def check_record(obj: Any) -> bool:
    """True for a dict whose `checksum` matches (or that has none: written before checksums)."""
    if not isinstance(obj, dict):
        return False
    if "checksum" not in obj:
        return True
    return obj["checksum"] == _json_checksum({k: v for k, v in obj.items() if k != "checksum"})


def read_safetensors(path: str | Path) -> tuple[dict, dict]:
    """(header metadata, every tensor) of a safetensors file in one open; raises what safetensors raises
    for a truncated or foreign file, for the caller to turn into its own message."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
