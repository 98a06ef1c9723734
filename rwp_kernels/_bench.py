"""Timing helpers shared by the benchmark scripts (benchmarks/*.py), which import no script of their own."""
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def times_ms(fn: Callable[[], object], device: torch.device, repeats: int, *, warmup: int,
             setup: Callable[[], object] | None = None) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``setup`` runs untimed
    before every call."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def paired_ratio(fn: Callable[[], object], baseline: Callable[[], object], pairs: int, device: torch.device,
                 warmup: int = 2) -> float:
    """Median over ``pairs`` back-to-back (fn, baseline) calls of time(fn) / time(baseline): both calls of
    a pair see the same state of a shared machine, which the medians of separate series do not."""
    ratios = []
    for i in range(warmup + pairs):
        times = []
        for f in (fn, baseline):
            sync(device)
            start = time.perf_counter()
            f()
            sync(device)
            times.append(time.perf_counter() - start)
        if i >= warmup:
            ratios.append(times[0] / times[1])
    return statistics.median(ratios)
