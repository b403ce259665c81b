"""Crashes with real processes and real signals.

A child process (crash_child.py) streams messages for 20 signed-in users and reports
every acknowledged write and every completed flush on a pipe. SIGKILL at a random
moment may lose only what no completed flush covered; SIGTERM loses nothing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .crash_child import content
from .helpers import assert_prefixes, integrity, on_disk

CHILD = Path(__file__).with_name("crash_child.py")
ROUNDS = int(os.environ.get("WRITEBEHIND_CRASH_ROUNDS", "4"))


def start(db_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


def read_until(child: subprocess.Popen[str], want_flushes: int, seen: list[str]) -> None:
    assert child.stdout is not None
    flushes = 0
    deadline = time.monotonic() + 60
    while flushes < want_flushes:
        assert time.monotonic() < deadline, "the child made no progress"
        line = child.stdout.readline()
        assert line, f"the child died: {child.stderr.read() if child.stderr else ''}"
        seen.append(line)
        flushes += line.startswith("FLUSHED")


def last_flush(lines: list[str]) -> dict[str, int]:
    reports = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("FLUSHED")]
    return reports[-1] if reports else {}


def acked(lines: list[str]) -> dict[str, int]:
    result: dict[str, int] = {}
    for line in lines:
        if line.startswith("ACK "):
            _, sid, seq = line.split()
            result[sid] = max(result.get(sid, 0), int(seq))
    return result


def check_disk(db_path: Path, covered: dict[str, int], most: dict[str, int]) -> None:
    assert integrity(db_path) == "ok"
    lengths = assert_prefixes(db_path)
    disk = on_disk(db_path)
    for sid, seq in covered.items():
        assert lengths.get(sid, 0) >= seq, (
            f"{sid}: a completed flush covered seq {seq}, disk has {lengths.get(sid)}"
        )
    for sid, messages in disk.items():
        assert len(messages) <= most.get(sid, 0), f"{sid}: more on disk than was ever acknowledged"
        for seq, text in messages.items():
            # a message is either whole on disk or, if it was mid-stream, a prefix of it
            assert content(sid, seq).startswith(text), f"{sid} #{seq} is not what was written"


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_sigkill_loses_at_most_what_no_completed_flush_covered(tmp_path: Path, round_: int) -> None:
    rng = random.Random(round_)
    db_path = tmp_path / "crash.db"
    child = start(db_path)
    lines: list[str] = []
    try:
        read_until(child, rng.randint(1, 4), lines)
        time.sleep(rng.uniform(0, 0.15))  # kill between flushes, or in the middle of one
    finally:
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    lines += out.splitlines(keepends=True)
    covered = last_flush(lines)
    assert covered, "no flush completed before the kill"
    check_disk(db_path, covered, acked(lines))


def test_sigterm_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db_path = tmp_path / "term.db"
    child = start(db_path)
    lines: list[str] = []
    read_until(child, 2, lines)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    lines += out.splitlines(keepends=True)
    assert lines[-1].strip() == "CLOSED"
    everything = acked(lines)
    check_disk(db_path, everything, everything)
    disk = on_disk(db_path)
    for sid, seq in everything.items():
        assert len(disk[sid]) == seq
        assert all(disk[sid][s] == content(sid, s) for s in range(1, seq + 1))
