"""The recovery file: where dirty sessions go when the backend still refuses them at shutdown.

It lies beside the database (`<db>.recovery`), mode 0600, written atomically
(temporary file, fsync, rename). The next `start()` replays it into the backend
and removes it. Secrets are never in it: records are encoded by `encode_record`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

import orjson

from .errors import StorageError
from .model import SessionRecord, decode_record, encode_record, utcnow

__all__ = ["read_recovery", "recovery_path_for", "scrub_recovery", "write_recovery"]

_FORMAT: Final = 1


def recovery_path_for(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".recovery")


def write_recovery(path: Path, records: Sequence[SessionRecord], *, replace_all: bool = False) -> None:
    """Write `records` (added to what an earlier failed shutdown left, if anything, unless
    `replace_all`)."""
    existing = read_recovery(path) if path.exists() and not replace_all else []
    by_id = {r.id: r for r in existing}
    by_id.update((r.id, r) for r in records)
    payload = orjson.dumps(
        {
            "format": _FORMAT,
            "written_at": utcnow().isoformat(),
            "sessions": [{**encode_record(r), "version": r.version} for r in by_id.values()],
        }
    )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_recovery(path: Path) -> list[SessionRecord]:
    try:
        data = orjson.loads(path.read_bytes())
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return [replace(decode_record(item), version=item.get("version", 0)) for item in data["sessions"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"cannot read the recovery file {path}: {exc}; left in place") from exc


def scrub_recovery(path: Path, erased: Callable[[SessionRecord], bool]) -> int:
    """Remove the sessions `erased` picks from the recovery file at `path` and from the
    `<path>.refused-*` files kept beside it; returns how many. Erasure must reach these
    copies too, or the next start would bring an erased session back. A file left empty
    is removed."""
    removed = 0
    for file in [path, *sorted(path.parent.glob(path.name + ".refused-*"))]:
        if not file.exists():
            continue
        records = read_recovery(file)
        kept = [r for r in records if not erased(r)]
        if len(kept) == len(records):
            continue
        removed += len(records) - len(kept)
        if kept:
            write_recovery(file, kept, replace_all=True)
        else:
            file.unlink()
    return removed
