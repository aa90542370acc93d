"""One run at a time per output folder and architecture: a lock file holding the owner's PID and host.

Two trainings of one architecture into one folder would overwrite each other's resume state and model. The
lock file is created with O_EXCL (atomic on local disks and Google Drive's FUSE mount alike); a lock whose
process is gone (same host, PID not running) is stale and taken over with a notice.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from bloodcell_lib.atomic import describe_os_error
from bloodcell_lib.errors import OutputError


def lock_path(folder: str | Path, name: str) -> Path:
    """Return the lock file of `name` (an architecture key) in an output folder: OUT/.<name>.lock."""
    return Path(folder) / f".{name}.lock"


@contextlib.contextmanager
def run_lock(folder: str | Path, name: str, verbose: int = 1) -> Iterator[Path]:
    """Hold the lock of `name` in `folder` for the duration of the block; refuse when a live run holds it."""
    path = lock_path(folder, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, path)) from exc
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join(sys.argv)}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if attempt == 0 and _stale(holder):
                if verbose:
                    print(f"Removing the stale lock {path} of a run that is no longer running ({_who(holder)}).")
                path.unlink(missing_ok=True)
                continue
            raise OutputError(
                f"Another run is training {name} into {path.parent}: {_who(holder)}. Wait for it to finish, or "
                f"choose another output folder. If no such run is going on (e.g. it ran on another machine that "
                f"is gone), delete {path} and run again."
            ) from None
        except OSError as exc:
            raise OutputError(describe_os_error(exc, path)) from exc
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(owner, fh)
        break
    try:
        yield path
    finally:
        if _read(path).get("pid") == owner["pid"] and _read(path).get("host") == owner["host"]:
            path.unlink(missing_ok=True)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stale(holder: dict) -> bool:
    """True when the lock's process is certainly gone: this host, and its PID does not run (or is ours)."""
    if not holder:  # empty or unreadable: a run killed between creating and filling the file
        return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine (a shared Drive folder): we cannot tell
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return True  # our own process: a previous call in this kernel that cannot be running now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return False


def _who(holder: dict) -> str:
    if not holder:
        return "owner unknown"
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f" (`{holder['command']}`)" if holder.get("command") else ""))
