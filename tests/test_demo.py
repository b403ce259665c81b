"""`make run`'s main job, run the way a new user runs it: a real process on a real file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_keeps_the_signed_in_chat_and_forgets_the_anonymous_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    for run in (1, 2):
        result = subprocess.run(
            [sys.executable, "-m", "writebehind.demo"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        out = result.stdout
        assert "4 messages" in out
        assert "#4 assistant A graceful shutdown flushes everything that is dirty." in out
        assert "gone, it was never written to disk" in out
        assert f"user 1 has {run} session(s) on disk" in out
    assert (tmp_path / "chat_sessions.db").stat().st_mode & 0o777 == 0o600
