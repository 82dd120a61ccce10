"""Timing and device peaks.

GPU: `events` = triton.testing.do_bench, median of repeats, each timed with CUDA events (do_bench
writes a 256 MB buffer between repeats, so L2 starts cold); `graph` = N calls captured into
one CUDA graph, median over replays divided by N (removes launch gaps; inputs rotate across
calls, so caches do not flatter either).
CPU: the backends of one configuration side by side (`side_by_side`: interleaved rounds of ~1 ms blocks, each
backend's fastest block); `events` alone: torch.utils.benchmark.Timer.blocked_autorange, median over blocks.
Peaks, measured once at start on the same device: a large matmul per precision (TFLOP/s) and a
large device copy (GB/s, bytes read + bytes written), on random data.
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import torch

from benchmarks.cases import PRECISIONS, precision


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median time of fn() in milliseconds on `device`; `quick` trades accuracy for speed (smoke runs)."""

    def __init__(self, device: torch.device, quick: bool = False):
        self.device = device
        self.quick = quick
        # do_bench's warmup/rep are milliseconds of device time; CPU: seconds of autorange
        self.warmup_ms, self.rep_ms = (5, 20) if quick else (25, 100)
        self.cpu_min_run_s = 0.02 if quick else 0.3

    def events(self, fn) -> float:
        if self.device.type == "cuda":
            try:
                from triton.testing import do_bench
            except ImportError:
                return self._events_fallback(fn)
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        if self.quick:  # smoke runs: median of 5 short blocks, no autorange calibration
            return self._host_median(fn)
        from torch.utils.benchmark import Timer as TorchTimer
        m = TorchTimer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return m.blocked_autorange(min_run_time=self.cpu_min_run_s).median * 1e3

    def side_by_side(self, fns: list) -> list[float]:
        """CPU: milliseconds per call of each fn, timed in interleaved rounds -- each round runs a block of calls
        of every fn in turn -- each keeping its fastest block. On a shared machine other processes only ever add
        time, and a burst lands on every fn of a round alike instead of on whichever was being timed (the rows of
        one configuration are compared with each other). ~cpu_min_run_s per fn, at least 5 rounds."""
        numbers = []
        for fn in fns:  # a warm-up call, then one timed: calls per block for ~1 ms blocks (at least one call)
            fn()
            t0 = time.perf_counter()
            fn()
            numbers.append(max(1, min(1000, int(1e-3 / max(time.perf_counter() - t0, 1e-7)))))
        best = [math.inf] * len(fns)
        min_rounds = 3 if self.quick else 5
        deadline = time.perf_counter() + self.cpu_min_run_s * len(fns)
        rounds = 0
        while rounds < min_rounds or (time.perf_counter() < deadline and rounds < 1000):
            for i, (fn, number) in enumerate(zip(fns, numbers)):
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                best[i] = min(best[i], (time.perf_counter() - t0) / number)
            rounds += 1
        return [b * 1e3 for b in best]

    def _host_median(self, fn) -> float:
        t0 = time.perf_counter()
        fn()
        number = max(1, min(100, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) / number)
        return statistics.median(times) * 1e3

    def _events_fallback(self, fn) -> float:
        fn()
        sync(self.device)
        times = []
        for _ in range(10 if self.quick else 50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def graph(self, fn, estimate_ms: float) -> float:
        """Median per-call time of fn() replayed from a CUDA graph of enough calls to last ~2 ms."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        calls = max(1, min(200, math.ceil(2.0 / max(estimate_ms, 1e-3))))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        sync(self.device)
        times = []
        for _ in range(5 if self.quick else 20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        del graph
        return statistics.median(times)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that repeated runs could sit in: GPU L2, CPU L3 (32 MiB if unknown)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, KeyError):
        return 32 * 2**20


def measure_peaks(device: torch.device, precisions, quick: bool = False) -> dict:
    """Measured ceilings: matmul TFLOP/s per precision and device copy GB/s (reads + writes)."""
    timer = Timer(device, quick)
    gen = torch.Generator(device=device).manual_seed(1234)
    cuda = device.type == "cuda"
    n = (2048 if quick else 8192) if cuda else (256 if quick else 1024)
    copy_elems = ((64 if quick else 1024) if cuda else (16 if quick else 256)) * 2**20 // 4
    peaks = {"matmul_tflops": {}, "matmul_n": n, "copy_gbps": None, "copy_bytes": 2 * copy_elems * 4}
    for prec in precisions:
        if prec == "tf32" and not cuda:
            continue  # TF32 exists on NVIDIA GPUs only
        dtype = PRECISIONS[prec]
        with precision(prec):
            a = torch.randn(n, n, generator=gen, device=device).to(dtype)
            b = torch.randn(n, n, generator=gen, device=device).to(dtype)
            ms = timer.events(functools.partial(torch.mm, a, b))
        peaks["matmul_tflops"][prec] = 2 * n**3 / (ms * 1e-3) / 1e12
        del a, b
    src = torch.randn(copy_elems, generator=gen, device=device)
    dst = torch.empty_like(src)
    ms = timer.events(functools.partial(dst.copy_, src))
    peaks["copy_gbps"] = peaks["copy_bytes"] / (ms * 1e-3) / 1e9
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return peaks
