"""`writebehind`: the operator's command line.

Works on the SQLite file directly. The reading verbs (`stats`, `sessions`, `export`,
`check`, `backup`, `purge --dry-run`) open it read-only, so they work beside a running
app: WAL lets them read while it writes, and they take no lock, migrate nothing and
write nothing.

`backups` lists the database's backups (CHAT_SESSION_BACKUP_DIR, or `--dir`). With
CHAT_SESSION_DB_URL set (PostgreSQL) every verb but `rotate-key` needs `--db`: the default
file is then no app's, and a backup or restore of it would mislead.

With encryption at rest (CHAT_SESSION_ENCRYPTION_KEY or _FILE), `sessions`, `export` and
`erase` go through `writebehind.encryption` as the app does: they decrypt, and `erase`
destroys the user's data key first. On an encrypted database without the key they refuse.
`rotate-key` re-wraps the data keys under a new key-encryption key, in the keys file beside
the SQLite file, or (CHAT_SESSION_DB_URL set) in the PostgreSQL keys schema.

The changing verbs (`erase`, `purge`, `migrate`, `restore`) need the file to themselves: a
running app owns it (it holds recent sessions in memory and would write them back at its next
flush), and holds its lock. So on a file an app holds they refuse, and say how to do the
same through the app: erase with the server's `DELETE /api/me` or `store.delete_user`,
purge by the app's own retention (`store.purge_expired()`), and the app migrates the
file when it starts; a restore needs the app stopped. While one of them runs, an app
cannot start on the file either.

Mistakes get one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from .backends.base import Backend
from .backends.sqlite import SCHEMA_VERSION, SQLiteBackend
from .backups import Backup, BackupContents, copy_database, list_backups, restore_backup
from .config import Config, decode_kek
from .errors import ConfigError, DatabaseLockedError, WriteBehindError
from .export import export_json
from .model import SessionRecord, UserId, check_user_id, utcnow
from .ownership import lock_path_for
from .recovery import recovery_path_for, scrub_recovery
from .stats import read_status, status_path_for

if TYPE_CHECKING:
    from .encryption import PostgresKeyStore

__all__ = ["main"]

T = TypeVar("T")
_DURATION = re.compile(r"(\d+)\s*([dhm])")


def _run(work: Callable[[SQLiteBackend], Awaitable[T]], db: Path, *, changing: str | None = None) -> T:
    """Run `work` on the file: read-only, or, when `changing` is given, as the file's one
    store (its lock held); `changing` then says how to do the same through a running app,
    for the refusal when one holds the file."""

    async def go() -> T:
        backend = SQLiteBackend(db, readonly=changing is None)
        await backend.open()
        try:
            return await work(backend)
        finally:
            await backend.close()

    try:
        return asyncio.run(go())
    except DatabaseLockedError as exc:
        pid = "unknown" if exc.pid is None else exc.pid
        holder = f"pid {pid} on host {exc.host or 'unknown'}"
        raise click.ClickException(f"{db} is in use by a running app ({holder}): {changing}") from None
    except WriteBehindError as exc:
        raise click.ClickException(str(exc)) from None


def _as_app_sees_it(backend: SQLiteBackend, uid: UserId, *, erasing: bool = False) -> Backend:
    """The backend, decrypting (and destroying keys on erasure) when a key is configured.
    Refuses an encrypted database without its key: a listing would show ciphertext, and an
    erasure would leave the user's key, so their backups readable. Refuses one whose keys
    file is missing (a database restored or copied without it): with or without the key,
    `uid`'s sealed sessions could only come out as ciphertext. An erasure goes on then, on
    the rows alone: there is no key left to destroy, and none is made."""
    try:
        config = Config.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    keys = config.encryption_keys_path or backend.path.with_name(backend.path.name + ".keys")
    if not keys.exists() and _sealed(backend.path, uid):
        if erasing:
            return backend
        raise click.ClickException(
            f"{backend.path} holds encrypted sessions of user {uid!r}, and its keys file {keys} does not "
            "exist: put it back (from its own backup), or name it with CHAT_SESSION_ENCRYPTION_KEYS_PATH"
        )
    if config.encryption_key is None and config.encryption_key_file is None:
        if keys.exists():
            raise click.ClickException(
                f"{backend.path} is encrypted (keys in {keys}): set CHAT_SESSION_ENCRYPTION_KEY "
                "(or CHAT_SESSION_ENCRYPTION_KEY_FILE) as the app has it"
            )
        return backend
    from .encryption import encrypted_backend

    return encrypted_backend(backend, config, readonly=backend.readonly)


def _sealed(db: Path, uid: UserId) -> bool:
    """Whether `uid` has sessions sealed with a data key (a look at that user's rows only)."""
    try:
        conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return False  # the verb's own open says what is wrong
    try:
        found = conn.execute(
            "SELECT 1 FROM sessions WHERE user_id = ? AND (typeof(title) = 'blob' "
            "OR substr(title, 1, 5) = 'wbe1:') LIMIT 1",
            (uid,),
        ).fetchone()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return found is not None


def _app_running(db: Path) -> tuple[bool | None, int | None]:
    """Whether an app holds the file, from its lock file's holder line (written while held,
    emptied at release): (running, pid). None when the holder is on another host. Never
    takes the lock: an app starting at that moment would be refused."""
    try:
        # Beside the file itself, whatever link names it (as `FileLock` puts it).
        line = lock_path_for(db.resolve()).read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False, None
    if len(line) < 2 or not line[0].isdigit():
        return False, None
    pid = int(line[0])
    if line[1] != socket.gethostname():
        return None, pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None  # killed: the kernel let its lock go, its line stayed
    except PermissionError:
        pass  # alive, another user's
    return True, pid


def _user(value: str, as_text: bool) -> UserId:
    """`42` is the int user 42 (what most apps use); `--text-id` makes it the str "42"."""
    parsed: object = value if as_text or not re.fullmatch(r"-?\d+", value) else int(value)
    try:
        uid = check_user_id(parsed, "--user")
    except WriteBehindError as exc:
        raise click.BadParameter(str(exc)) from None
    assert uid is not None
    return uid


def _duration(value: str) -> timedelta:
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r}: give a number and d, h or m, like 90d")
    amount, unit = int(match[1]), match[2]
    return {"d": timedelta(days=amount), "h": timedelta(hours=amount), "m": timedelta(minutes=amount)}[unit]


def _recovery_path(db: Path) -> Path:
    """Where the app saves what a failed shutdown left: CHAT_SESSION_RECOVERY_PATH, or
    beside the database."""
    try:
        configured = Config.from_env().recovery_path
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return configured or recovery_path_for(db)


def _backup_dir(explicit: Path | None, *, required: bool = True) -> Path | None:
    """`--dir`, else CHAT_SESSION_BACKUP_DIR."""
    if explicit is not None:
        return explicit
    try:
        configured = Config.from_env().backup_dir
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if configured is None and required:
        raise click.ClickException("no backup directory: pass --dir, or set CHAT_SESSION_BACKUP_DIR")
    return configured


def _listed(directory: Path, db: Path) -> list[Backup]:
    try:
        return list_backups(directory, db)
    except WriteBehindError as exc:
        raise click.ClickException(str(exc)) from None


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _db_url_set() -> bool:
    try:
        return Config.from_env().db_url is not None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _default_db() -> Path:
    try:
        return Config.from_env().db_path
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


user_option = click.option("--user", "user", required=True, help="The user id (digits mean an int id).")
text_option = click.option("--text-id", is_flag=True, help="Treat --user as a text id even if it is digits.")


@click.group()
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The database file (default: $CHAT_SESSION_DB_PATH or ./chat_sessions.db).",
)
@click.pass_context
def cli(ctx: click.Context, db: Path | None) -> None:
    """Inspect and maintain a writebehind session database."""
    if db is None and ctx.invoked_subcommand != "rotate-key" and _db_url_set():
        # The app's data is in PostgreSQL: ./chat_sessions.db is no app's, and a restore or
        # a backup of it reporting success would mislead.
        raise click.ClickException(
            "CHAT_SESSION_DB_URL is set: the app's data is in PostgreSQL, and this command works on a "
            "SQLite file; pass --db to name one (for PostgreSQL: pg_dump and pg_restore, and the app's "
            "stats() and metrics)"
        )
    path = db or _default_db()
    # A restore is what puts a lost database back; the backups are listed without it.
    # rotate-key checks for itself: on PostgreSQL there is no file.
    exempt = ("migrate", "backup", "backups", "restore", "rotate-key")
    if ctx.invoked_subcommand not in exempt and not path.exists():
        raise click.ClickException(f"{path} does not exist (use --db, or run the app once)")
    ctx.obj = path


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def stats(db: Path, as_json: bool) -> None:
    """Counts, sizes, schema version and activity range; the running app's cleanups and
    backups (from the status file it keeps beside the database), and the backups on disk
    (CHAT_SESSION_BACKUP_DIR)."""
    info = _run(lambda b: b.file_stats(), db)
    info["db_bytes"] = info["file_bytes"] + info["wal_bytes"]
    # Whether the app is running now, and what it last reported (the status file outlives it).
    info["app_running"], lock_pid = _app_running(db)
    if lock_pid is not None:
        info["app_lock_pid"] = lock_pid
    status = read_status(status_path_for(db))
    if status is not None:
        # What the app last reported (it rewrites the file when one of these changes):
        # counts since that app started.
        info["app_pid"] = status.get("pid")
        info["app_reported_at"] = status.get("written_at")
        for key in (
            "last_cleanup_at", "cleanup_failures", "sessions_purged", "last_backup_at",
            "backups_made", "backup_failures", "consecutive_backup_failures",
            "consecutive_failures", "total_failures",
        ):  # fmt: skip
            info[key] = status.get(key)
    directory = _backup_dir(None, required=False)
    if directory is not None:
        found = _listed(directory, db)
        info["backups"] = len(found)
        info["newest_backup_at"] = found[0].taken_at.isoformat() if found else None
    if as_json:
        click.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
        return
    for key, value in info.items():
        click.echo(f"{key:16} {value}")


@cli.command()
@user_option
@text_option
@click.pass_obj
def sessions(db: Path, user: str, text_id: bool) -> None:
    """List a user's sessions, newest first."""
    uid = _user(user, text_id)

    async def work(backend: SQLiteBackend) -> list[Any]:
        source = _as_app_sees_it(backend, uid)
        await source.open()
        try:
            return await source.list_sessions(uid)
        finally:
            await source.close()

    listed = _run(work, db)
    for s in listed:
        title = "" if s.title is None else s.title
        click.echo(f"{s.id}\t{s.status}\t{s.message_count} messages\t{s.updated_at.isoformat()}\t{title}")
    click.echo(f"{len(listed)} session(s) for user {uid!r}", err=True)


@cli.command()
@user_option
@text_option
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here (0600) instead of stdout."
)
@click.pass_obj
def export(db: Path, user: str, text_id: bool, out: Path | None) -> None:
    """Everything stored for a user, as one JSON document (GDPR Art. 15 and 20)."""
    uid = _user(user, text_id)

    async def work(backend: SQLiteBackend) -> int:
        source = _as_app_sees_it(backend, uid)
        await source.open()
        try:
            return await write(source)
        finally:
            await source.close()

    async def write(backend: Backend) -> int:
        count = 0

        async def counted() -> AsyncIterator[SessionRecord]:
            nonlocal count
            async for record in backend.iter_user_sessions(uid):
                count += 1
                if count % 500 == 0:
                    click.echo(f"exported {count} sessions...", err=True)
                yield record

        if out is None:
            async for chunk in export_json(uid, counted()):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.write(b"\n")
            return count
        fd = os.open(out, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            async for chunk in export_json(uid, counted()):
                f.write(chunk)
        return count

    count = _run(work, db)
    click.echo(f"exported {count} session(s) of user {uid!r}" + (f" to {out}" if out else ""), err=True)


@cli.command()
@user_option
@text_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def erase(db: Path, user: str, text_id: bool, yes: bool) -> None:
    """Delete every session of a user, leaving no byte behind (GDPR Art. 17)."""
    uid = _user(user, text_id)

    async def work(backend: SQLiteBackend) -> list[str]:
        # Asked only once the file is ours: a held file is refused before the question.
        if not yes:
            click.confirm(f"Erase every session of user {uid!r} from {db}? This cannot be undone", abort=True)
        source = _as_app_sees_it(backend, uid, erasing=True)
        await source.open()
        try:
            ids = await source.delete_user(uid)
        finally:
            await source.close()
        # And from what a failed shutdown left for the next start, or that start would
        # bring the erased sessions back.
        scrub_recovery(_recovery_path(db), lambda record: record.user_id == uid)
        return ids

    ids = _run(
        work,
        db,
        changing="erase through the app instead: the server's DELETE /api/me (as that user), "
        f"or store.delete_user({uid!r}); or stop the app and run this again",
    )
    click.echo(f"erased {len(ids)} session(s) of user {uid!r}")


@cli.command()
@click.option("--older-than", "older_than", required=True, help="Idle for longer than this: 90d, 12h, 30m.")
@click.option("--dry-run", is_flag=True, help="Only count.")
@click.pass_obj
def purge(db: Path, older_than: str, dry_run: bool) -> None:
    """Delete sessions idle for longer than --older-than (retention)."""
    cutoff = utcnow() - _duration(older_than)
    if dry_run:
        count = _run(lambda b: b.count_older_than(cutoff), db)
        click.echo(f"would purge {count} session(s) idle since before {cutoff.isoformat()}")
        return

    async def work(backend: SQLiteBackend) -> int:
        total = 0
        while True:
            ids = await backend.purge_older_than(cutoff, limit=500)
            total += len(ids)
            if ids:
                click.echo(f"purged {total} sessions...", err=True)
            if len(ids) < 500:
                return total

    total = _run(
        work,
        db,
        changing="the app purges by its own retention (CHAT_SESSION_RETENTION_DAYS, "
        "store.purge_expired()); or stop the app and run this again",
    )
    click.echo(f"purged {total} session(s) idle since before {cutoff.isoformat()}")


@cli.command()
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def backup(db: Path, dest: Path) -> None:
    """A consistent online copy of the database at DEST (0600), integrity-checked: one
    self-contained file, as the scheduled backups are; nothing is left at DEST if it fails."""
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    try:
        copy_database(db, dest, busy_timeout_ms=Config.from_env().busy_timeout_ms)
    except WriteBehindError as exc:  # ConfigError included
        raise click.ClickException(str(exc)) from None
    click.echo(f"backed up {db} to {dest} (integrity ok)")


@cli.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The backup directory (default: $CHAT_SESSION_BACKUP_DIR).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def backups(db: Path, directory: Path | None, as_json: bool) -> None:
    """The database's backups, newest first: when each was taken (UTC) and its size."""
    where = _backup_dir(directory)
    assert where is not None
    if not where.is_dir():
        raise click.ClickException(f"{where} is not a directory")
    found = _listed(where, db)
    sys.stdout.flush()
    out = sys.stdout.buffer
    if as_json:
        rows = [{"path": str(b.path), "taken_at": b.taken_at.isoformat(), "bytes": b.size} for b in found]
        # A path that is not UTF-8 holds lone surrogates (os.fsdecode): written as JSON's
        # \udcXX escapes, which json.loads and os.fsencode turn back into the same bytes.
        text = json.dumps(rows, indent=2, ensure_ascii=False)
        out.write(text.encode("utf-8", "backslashreplace") + b"\n")
    else:
        for b in found:
            # The path's own bytes, as `ls` prints them: one that is not UTF-8 can be pasted back.
            head = f"{b.taken_at.isoformat()}\t{b.size}\t{_size(b.size)}\t".encode()
            out.write(head + os.fsencode(b.path) + b"\n")
    out.flush()
    click.echo(f"{len(found)} backup(s) of {db.name} in {where}", err=True)


@cli.command()
@click.argument("backup", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def restore(db: Path, backup: Path, yes: bool) -> None:
    """Put BACKUP (a path, or a name in the backup directory) in place of the database.

    The app must be stopped: a file an app holds is refused. The backup is copied and
    checked (integrity, schema; an encrypted one against the keys file, which must hold
    its keys) before anything changes; the current database is kept aside as
    <db>.before-restore-<time> (delete it once the restore is right).
    """
    if not backup.exists() and backup.name == str(backup):
        directory = _backup_dir(None, required=False)
        if directory is not None and (directory / backup).is_file():
            backup = directory / backup
    if not backup.is_file():
        raise click.ClickException(f"{backup} is not a backup file")

    def confirm() -> None:
        # Asked only once the file is ours and the backup has passed its checks.
        if not yes:
            click.confirm(
                f"Replace {db} with the backup {backup.name}? The current file is kept aside", abort=True
            )

    found = BackupContents()

    def checked(contents: BackupContents) -> None:
        nonlocal found
        found = contents

    try:
        keys = Config.from_env().encryption_keys_path
        aside = restore_backup(backup, db, confirm=confirm, keys_path=keys, checked=checked)
    except DatabaseLockedError as exc:
        pid = "unknown" if exc.pid is None else exc.pid
        raise click.ClickException(
            f"{db} is in use by a running app (pid {pid} on host {exc.host or 'unknown'}): "
            "stop the app, then restore"
        ) from None
    except WriteBehindError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"restored {db} from {backup} (integrity ok)")
    if found.data_keys:
        click.echo(
            f"its sessions are encrypted ({found.data_keys} data key(s), all in the keys file); "
            f"{found.erased} erased user(s) in it stay unreadable"
        )
    if aside is not None:
        click.echo(f"the previous database is kept as {aside}: delete it once the restore is right")
    if _recovery_path(db).exists():
        click.echo(
            f"note: {_recovery_path(db)} holds sessions a failed shutdown saved; the app replays "
            "them onto the restored database when it starts (move it away to drop them)",
            err=True,
        )


@cli.command()
@click.pass_obj
def check(db: Path) -> None:
    """Integrity check and schema version; exits 1 if anything is wrong."""

    async def work(backend: SQLiteBackend) -> tuple[list[str], int]:
        return await backend.integrity_check(), await backend.schema_version()

    problems, version = _run(work, db)
    click.echo(f"schema version {version} (this writebehind: {SCHEMA_VERSION})")
    if problems != ["ok"]:
        for line in problems:
            click.echo(f"integrity: {line}", err=True)
        raise SystemExit(1)
    click.echo("integrity ok")


@cli.command()
@click.pass_obj
def migrate(db: Path) -> None:
    """Create the database, or bring its schema to this version."""
    version: Any = _run(
        lambda b: b.schema_version(),
        db,
        changing="the app migrates the file itself when it starts; nothing to do here",
    )
    click.echo(f"{db}: schema version {version}")


@cli.command("rotate-key")
@click.option(
    "--new-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A file holding the new key (base64 of 32 bytes); default: $CHAT_SESSION_NEW_ENCRYPTION_KEY.",
)
@click.pass_obj
def rotate_key(db: Path, new_key_file: Path | None) -> None:
    """Re-wrap every user's data key under a new key-encryption key; no data is rewritten.

    The current key comes from CHAT_SESSION_ENCRYPTION_KEY (or _FILE), as the app has it.
    SQLite: the keys file beside --db (or CHAT_SESSION_ENCRYPTION_KEYS_PATH). PostgreSQL
    (CHAT_SESSION_DB_URL set): the keys schema of CHAT_SESSION_DB_SCHEMA (`<schema>_keys`).
    The app must be stopped (on PostgreSQL: every instance on the schema); start it with
    the new key afterwards (the old one no longer opens the keys store).
    """
    from .encryption import (
        KeyStore,
        PostgresKeyStore,
        SQLiteKeyStore,
        keys_path_for,
        keys_schema_for,
        load_kek,
        rotate_kek,
    )

    try:
        config = Config.from_env()
        old = load_kek(config)
        if new_key_file is not None:
            new = load_kek(Config(encryption_key_file=new_key_file))
        else:
            text = os.environ.get("CHAT_SESSION_NEW_ENCRYPTION_KEY")
            new = None if not text else decode_kek(text, "CHAT_SESSION_NEW_ENCRYPTION_KEY")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if old is None:
        raise click.ClickException(
            "no current key: set CHAT_SESSION_ENCRYPTION_KEY (or _FILE) as the app has it"
        )
    if new is None:
        raise click.ClickException("no new key: pass --new-key-file, or set CHAT_SESSION_NEW_ENCRYPTION_KEY")
    if new == old:
        raise click.ClickException("the new key is the current one")
    keys: KeyStore
    if config.db_url is not None:
        keys = PostgresKeyStore(config.db_url, keys_schema_for(config.db_schema))
        try:
            count = asyncio.run(_rotate_postgres(keys, config.db_schema, old, new))
        except WriteBehindError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"re-wrapped {count} data key(s) in {keys.where}; start the app with the new key")
        return
    if not db.exists():
        raise click.ClickException(
            f"{db} does not exist (use --db, or set CHAT_SESSION_DB_URL for PostgreSQL)"
        )
    path = config.encryption_keys_path or keys_path_for(db)
    if not path.exists():
        raise click.ClickException(f"{path} does not exist: nothing is encrypted with a key to rotate")
    keys = SQLiteKeyStore(path)

    async def work(_: SQLiteBackend) -> int:
        return await rotate_kek(keys, old, new)

    count = _run(work, db, changing="stop the app, rotate the key, then start the app with the new key")
    click.echo(f"re-wrapped {count} data key(s) in {path}; start the app with the new key")


async def _rotate_postgres(keys: PostgresKeyStore, schema: str, old: bytes, new: bytes) -> int:
    """`rotate_kek` on PostgreSQL, refused while an app instance runs on `schema` (one holds
    its liveness lock: see `pg_ownership`) or when the keys schema does not exist (it would
    be created, empty, with the new key)."""
    import asyncpg

    from .encryption import rotate_kek

    try:
        conn = await asyncpg.connect(keys.dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise click.ClickException(f"cannot connect to PostgreSQL: {exc}") from None
    try:
        if await conn.fetchval("SELECT to_regclass($1)", f"{keys.schema}.meta") is None:
            raise click.ClickException(
                f"{keys.where} does not exist: nothing is encrypted with a key to rotate"
            )
        running = 0
        if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.instances") is not None:
            # A running instance holds its lock: one this transaction can take is a dead one's.
            async with conn.transaction():
                running = await conn.fetchval(
                    f"SELECT count(*) FROM {schema}.instances WHERE NOT pg_try_advisory_xact_lock(lock_key)"
                )
    finally:
        await conn.close()
    if running:
        raise click.ClickException(
            f"{running} app instance(s) are running on schema {schema}: stop them, rotate the key, "
            "then start them with the new key"
        )
    return await rotate_kek(keys, old, new)


def main() -> None:
    cli(prog_name="writebehind")


if __name__ == "__main__":
    main()
