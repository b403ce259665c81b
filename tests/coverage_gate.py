"""The coverage gate of `make test`: lines and branches are checked apart.

    python tests/coverage_gate.py build/coverage/coverage.json --lines 90 --branches 85

coverage's own `fail_under` applies to one figure, lines and branches counted together;
a suite can pass it with most branches never taken. This reads the totals of
`coverage json` and fails (exit 1) when either figure is below its floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="coverage_gate")
    parser.add_argument("report", type=Path, help="the output of `coverage json`")
    parser.add_argument("--lines", type=float, required=True, help="the floor for lines, in %%")
    parser.add_argument("--branches", type=float, required=True, help="the floor for branches, in %%")
    args = parser.parse_args()
    totals = json.loads(args.report.read_text())["totals"]
    figures = {
        "lines": (totals["covered_lines"], totals["num_statements"], args.lines),
        "branches": (totals["covered_branches"], totals["num_branches"], args.branches),
    }
    failed = False
    for name, (covered, total, floor) in figures.items():
        percent = 100.0 * covered / total if total else 100.0
        ok = percent >= floor
        failed |= not ok
        verdict = "ok" if ok else "FAIL"
        print(f"coverage of {name}: {percent:.1f}% ({covered}/{total}), floor {floor:g}%: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
