"""Atomic file writes: write a temporary file beside the target, then rename it into place.

A crash, a SIGKILL or a Colab disconnect mid-write leaves the previous file intact, never half a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bloodcell_lib.errors import OutputError

# The prefix and suffix of atomic_path's temporary files: `.<stem>.<random>.tmp<suffix>` beside the target.
TEMP_MARK = ".tmp"


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it over the target."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f"{TEMP_MARK}{target.suffix}",
                                   dir=target.parent)
    except OSError as exc:  # a file where a folder should be, a read-only or full disk
        raise OutputError(describe_os_error(exc, target)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except OSError as exc:  # the disk filled up mid-write, or the target is a folder: the old file is intact
        raise OutputError(describe_os_error(exc, target)) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path, stem: str) -> list[Path]:
    """Delete the temporary files atomic_path left for `stem` in `folder` when a run was killed mid-write.

    Call it only while no other process writes that file (training holds its lock when it does).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(f".{stem}.*{TEMP_MARK}*"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def describe_os_error(exc: OSError, target: str | Path | None = None) -> str:
    """Say what an OSError means for a user: which path, what was wrong, what to do."""
    where = Path(exc.filename) if exc.filename else (Path(target) if target is not None else None)
    target = Path(target) if target is not None else where
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"Cannot write {target}: the disk or quota is full. Free some space (or choose another output "
                "folder) and run the same command again; files written before are unchanged.")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"Cannot write {target}: {where} is not writable ({exc.strerror}). Choose a writable output "
                "folder (--output) or fix its permissions.")
    if code in (errno.EEXIST, errno.ENOTDIR) and target is not None:
        blocker = next((p for p in [target, *target.parents] if p.exists() and not p.is_dir()), where)
        return (f"Cannot write {target}: {blocker} is a file, not a folder. Give a folder path for the output, "
                "or move that file away.")
    if code == errno.EISDIR:
        return f"Cannot write {target}: it is a folder; give the path of a file to write instead."
    if code == errno.ENOENT:
        return f"{where} does not exist; check the path."
    return f"Cannot use {where}: {exc.strerror or exc}. Check the path, its permissions and the free space."


def write_bytes(target: str | Path, data: bytes) -> Path:
    """Write bytes to target atomically and return the target path."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    """Write UTF-8 text to target atomically and return the target path."""
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any) -> Path:
    """Write obj as strict, indented JSON atomically (numpy converted, NaN/inf as null) and return the path."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, ensure_ascii=False, allow_nan=False)
    return write_text(target, text + "\n")


def _finite(obj: Any) -> Any:
    """Replace NaN and infinities by None, recursively, so every JSON parser can read the file."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")
