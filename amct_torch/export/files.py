"""Writing several output files all or nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["write_all"]


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_all(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Write several files all or nothing.

    Each file is written to a temporary name first; only when all succeeded are they moved into place,
    and if a move fails the files moved so far are restored from backups of what was there before.
    """
    for path in writers:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; nothing was written")
        path.parent.mkdir(parents=True, exist_ok=True)
    temps = {path: _temp(path) for path in writers}
    backups: dict[Path, Path] = {}
    moved: list[Path] = []
    try:
        for path, write in writers.items():
            write(temps[path])
        for path in writers:
            if path.exists():
                backups[path] = path.with_name(f".{path.name}.bak-{os.getpid()}")
                os.replace(path, backups[path])
            os.replace(temps[path], path)
            moved.append(path)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        for path, backup in backups.items():
            if backup.exists():
                os.replace(backup, path)
        raise
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for backup in backups.values():
            backup.unlink(missing_ok=True)
