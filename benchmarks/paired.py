"""Paired, interleaved comparison: the one way to compare on a small shared VM.

Whole stretches of a run here are ~50% slower than others (the host's doing), so
two benchmarks run one after the other can land in different stretches. Instead,
every timed round of the contender (measured by pytest-benchmark) is preceded, in
its untimed setup, by one round of the baseline on the same kind of input; the
figure is the median of the per-round ratios, with its quartiles.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

__all__ = ["run_paired"]


def run_paired(
    benchmark: BenchmarkFixture,
    *,
    loop: asyncio.AbstractEventLoop,
    name: str,
    baseline_name: str,
    baseline: Callable[[], Callable[[], Any]],
    contender: Callable[[], Callable[[], Any]],
    rounds: int,
    per_round: int,
    unit: str,
    target: str,
) -> None:
    """`baseline()` / `contender()` prepare a round (untimed) and return the callable to
    time; a returned coroutine function's result is run on `loop`."""
    baseline_times: list[float] = []

    def run(fn: Callable[[], Any]) -> None:
        result = fn()
        if asyncio.iscoroutine(result):
            loop.run_until_complete(result)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        timed = baseline()
        gc.collect()
        started = time.perf_counter()
        run(timed)
        baseline_times.append(time.perf_counter() - started)
        timed = contender()
        gc.collect()
        return (timed,), {}

    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=2)
    contender_times = benchmark.stats.stats.data
    paired = baseline_times[-len(contender_times) :]
    ratios = [c / b for b, c in zip(paired, contender_times, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    benchmark.extra_info.update(
        name=name,
        baseline=baseline_name,
        baseline_min_s=min(paired),
        baseline_median_s=statistics.median(paired),
        ratio_median=statistics.median(ratios),
        ratio_p25=quartiles[0],
        ratio_p75=quartiles[2],
        per_round=per_round,
        unit=unit,
        target=target,
    )
