"""Print the side-by-side ratios of a `make bench` run from pytest-benchmark's JSON.

python benchmarks/report.py .benchmarks/latest.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# (group prefix, the contender, the baseline, what "good" is)
PAIRS = [
    ("append_message", "WriteBehindStore", "SessionStore", "target <= 1.30x"),
    ("update_message", "WriteBehindStore", "SessionStore", ""),
    ("get_messages", "WriteBehindStore", "SessionStore", ""),
]


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["name"]] = bench["stats"]
    print(
        f"machine: {data['machine_info']['cpu'].get('brand_raw', '?')}, "
        f"python {data['machine_info']['python_version']}"
    )
    for group, by_name in sorted(groups.items()):
        print(f"\n{group}")
        for name, stats in sorted(by_name.items()):
            print(f"  {name:45s} min {stats['min'] * 1e3:8.3f} ms   median {stats['median'] * 1e3:8.3f} ms")
        for prefix, contender, baseline, target in PAIRS:
            if not group.startswith(prefix):
                continue
            c = next(s for n, s in by_name.items() if contender in n)
            b = next(s for n, s in by_name.items() if baseline in n)
            per_call = 1e6 / int(group.rsplit("x", 1)[1])
            print(
                f"  -> {contender} / {baseline}: {c['min'] / b['min']:.2f}x by min, "
                f"{c['median'] / b['median']:.2f}x by median "
                f"({c['median'] * per_call:.2f} vs {b['median'] * per_call:.2f} us a call) {target}"
            )
        if group.startswith("flush"):
            # Throughput is messages over total time, so the mean is its statistic; the
            # median is unstable here because every other commit also pays SQLite's WAL
            # auto-checkpoint, on both sides alike (a bimodal distribution).
            wb = next(s for n, s in by_name.items() if "writebehind" in n)
            raw = next(s for n, s in by_name.items() if "raw" in n)
            messages = int(group.split()[1])
            print(
                f"  -> writebehind {messages / wb['mean']:,.0f} msg/s, raw sqlite3 "
                f"{messages / raw['mean']:,.0f} msg/s (by mean): {raw['mean'] / wb['mean']:.0%} "
                f"of raw (target >= 75%); {raw['min'] / wb['min']:.0%} by min"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/latest.json")
