"""Timing of GPU calls for the gpu-marked benchmarks: CUDA events around each call, median."""
import statistics

import torch


def time_cuda(fn, rounds=20):
    """Median milliseconds of fn over `rounds` calls after one untimed call, each bracketed by
    CUDA events on the current stream (so the host's launch overhead overlaps and only the
    device time between the events counts)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    times = []
    for _ in range(rounds):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
