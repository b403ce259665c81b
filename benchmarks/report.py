"""Print what a `make bench` run measured, from pytest-benchmark's JSON.

    python benchmarks/report.py .benchmarks/latest.json

Every benchmark here is paired (see paired.py): the contender is timed by
pytest-benchmark, its baseline ran interleaved with it, and the ratio is the median
of the per-round ratios time(contender) / time(baseline), with its quartiles.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    machine = data["machine_info"]
    print(f"machine: {machine['cpu'].get('brand_raw', '?')}, python {machine['python_version']}")
    for bench in sorted(data["benchmarks"], key=lambda b: b["group"]):
        stats, extra = bench["stats"], bench["extra_info"]
        if "p99_ratio" in extra:  # the SSE load test reports its own figures
            _sse_load(bench["group"], extra)
            continue
        per_round, unit = extra["per_round"], extra["unit"]
        us = 1e6 / per_round
        print(f"\n{bench['group']}")
        median, low = stats["median"] * us, stats["min"] * us
        print(f"  {extra['name']:40s} median {median:7.2f} us/{unit}   min {low:7.2f}")
        print(
            f"  {extra['baseline']:40s} median {extra['baseline_median_s'] * us:7.2f} us/{unit}"
            f"   min {extra['baseline_min_s'] * us:7.2f}"
        )
        ratio, low, high = extra["ratio_median"], extra["ratio_p25"], extra["ratio_p75"]
        if unit == "message":
            print(
                f"  -> {per_round / stats['median']:,.0f} vs {per_round / extra['baseline_median_s']:,.0f}"
                f" messages/s; paired: {1 / ratio:.0%} of the baseline's throughput"
                f" (quartiles {1 / high:.0%}-{1 / low:.0%}); {extra['target']}"
            )
        elif "times_lower_target" in extra:  # the framework adapters: "N x lower" is the claim
            goal = extra["times_lower_target"]
            verdict = (
                ""
                if goal is None
                else f"; target >= {goal:.0f}x: {'met' if 1 / ratio >= goal else 'NOT met'}"
            )
            print(
                f"  -> paired: median per call {1 / ratio:.1f}x lower than the baseline"
                f" (quartiles {1 / high:.1f}-{1 / low:.1f}x){verdict}"
            )
        else:
            print(
                f"  -> paired: {ratio:.2f}x the baseline (quartiles {low:.2f}-{high:.2f}) {extra['target']}"
            )
        if "p99_ms" in extra:  # a benchmark that also timed each call of the contender
            print(f"  -> p99 of a call: {extra['p99_ms']:.2f} ms")


def _sse_load(group: str, extra: dict[str, Any]) -> None:
    """The SSE load figures (benchmarks/test_sse_load.py), each side the median of its rounds."""
    wb, mem = extra["write_behind"], extra["in_memory"]
    delay = f", {extra['token_delay_ms']} ms between tokens" if "token_delay_ms" in extra else ""
    print(f"\n{group} (median of {extra['rounds']} alternating rounds{delay})")
    for name, r in (("write-behind (SQLite)", wb), ("in-memory SessionStore", mem)):
        line = (
            f"  {name:24s} {r['tokens_per_s']:7.0f} tokens/s   inter-token p50 "
            f"{r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms"
        )
        if "server_cpu_us_per_token" in r:  # runs before the clients had their own process lack it
            line += (
                f"   server CPU {r['server_cpu_us_per_token']:4.0f} us/token"
                f" ({r['server_utilisation']:.2f} of a core)"
            )
        print(line)
    p99, p50 = extra["p99_ratio"], extra["p50_ratio"]
    rounds = ", ".join(f"{r:.2f}" for r in extra.get("p99_ratios", ()))
    print(f"  -> p99 ratio {p99:.2f} (target <= 1.20; per round {rounds or '?'}), p50 ratio {p50:.2f}")
    if "cpu_ratio" in extra:
        clients = max(wb["client_utilisation"], mem["client_utilisation"])
        others = max(wb["other_cores"], mem["other_cores"])
        print(
            f"  -> server CPU per token: {extra['cpu_ratio']:.2f}x the in-memory server's; the client process"
            f" used {clients:.2f} of a core, other processes on the machine {others:.2f} cores"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/latest.json")
