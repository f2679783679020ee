"""Round-robin decode timing shared by the benchmarks (bench_decode, bench_runtime, bench_serving).

Several configurations (budgets, backends) decode side by side: one step of each per round, in the
same order every round, so load from other processes on a shared machine hits them alike. Each step
measures itself (a step times its model call, not the bookkeeping around it) and returns seconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def round_robin(steps: Mapping[K, Callable[[int], float]], rounds: int, warmup: int = 0) -> dict[K, list[float]]:
    """Run ``warmup + rounds`` rounds; in round t (0-based, warm-up included) call ``steps[key](t)``
    for every key in the mapping's order. Returns per key the seconds its steps returned in the
    ``rounds`` rounds after the warm-up, in order."""
    if rounds < 0 or warmup < 0:
        raise ValueError(f"rounds and warmup must be >= 0, got {rounds} and {warmup}")
    times: dict[K, list[float]] = {key: [] for key in steps}
    for t in range(warmup + rounds):
        for key, step in steps.items():
            seconds = step(t)
            if t >= warmup:
                times[key].append(seconds)
    return times


def median_ms(seconds: Sequence[float]) -> float:
    """The median of ``seconds`` in milliseconds (nan when there are none)."""
    return 1e3 * statistics.median(seconds) if seconds else float("nan")
