"""Kernel microbenchmarks: every layer, forward and forward+backward, every fusedcnn backend against torch.

    python benchmarks/kernels.py                       # preset "gpu" on a GPU, "cpu" otherwise
    python benchmarks/kernels.py --preset vgg          # the full matrix: 13 VGG16 shapes x batch 32/128 x ...
    python benchmarks/kernels.py --layers conv2d,batch_norm_relu --precisions bfloat16 \
        --layouts channels_last --groups vgg16-b128 --backends triton,cpp --graph

Per case and backend: time (GPU: median of CUDA events, optionally CUDA graph; CPU: the backends of a case
timed side by side in interleaved rounds, each its fastest block), achieved TFLOP/s (conv) or
GB/s (the rest) over the minimum FLOPs/bytes (benchmarks/cases/__init__.py says how they are
counted), the fraction of the roofline floor max(FLOPs/peak, bytes/bandwidth) built from the
peaks measured at start, the speedup against torch, and the max relative error against the golden
(torch's own call in float64 on the same inputs; torch's row is checked too). A result above the
tolerance is flagged WRONG and never ranked; a backend that cannot run a case
(not written yet, not built here) shows as "n/a (reason)" and the run goes on.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.cases import (GROUPS, LAYOUTS, MODES, PRECISIONS, TOLERANCES, Case, Spec,  # noqa: E402
                              all_cases, all_layers, precision)
from benchmarks.timing import Timer, cache_bytes, measure_peaks, sync  # noqa: E402

FUSED_BACKENDS = ("reference", "triton", "cpp", "auto")  # auto: fusedcnn.autotune's measured choice

# A plan: shape groups x precisions x layouts x modes (x layers); presets are ordered lists of plans,
# most important first, so a time budget cuts the least important cases.
ALL = list(GROUPS)
PRESETS = {
    "tiny": {"quick": True, "threads": 1, "plans": [
        {"groups": ["tiny"], "precisions": ["float32"], "layouts": list(LAYOUTS), "modes": list(MODES)}]},
    # One thread on CPU: on a shared 2-core machine, descheduled OpenMP threads made runs ~20x slower.
    "cpu": {"quick": False, "cpu_min_run_s": 0.1, "threads": 1, "plans": [
        {"groups": ["mini"], "precisions": ["float32"], "layouts": list(LAYOUTS), "modes": list(MODES)},
        {"groups": ["mini"], "precisions": ["bfloat16"], "layouts": ["nchw"], "modes": list(MODES)}]},
    "small": {"quick": False, "graph": True, "plans": [
        {"groups": ["small"], "precisions": ["bfloat16", "float32"], "layouts": list(LAYOUTS), "modes": list(MODES)}]},
    "vgg": {"quick": False, "plans": [
        {"groups": ["vgg16-b128", "vgg16-b32"], "precisions": ["bfloat16", "tf32", "float32"],
         "layouts": ["channels_last", "nchw"], "modes": ["fwdbwd", "fwd"]}]},
    "gpu": {"quick": False, "time_budget": 330, "warmup_ms": 10, "rep_ms": 50, "plans": [
        {"groups": ["vgg16-b128"], "precisions": ["bfloat16"], "layouts": ["channels_last"],
         "modes": ["fwdbwd", "fwd"]},
        {"groups": ["small"], "precisions": ["bfloat16"], "layouts": ["channels_last"], "modes": ["fwdbwd"],
         "graph": True},
        {"groups": ["vgg16-b128"], "precisions": ["tf32", "float32"], "layouts": ["nchw"], "modes": ["fwdbwd"],
         "layers": ["conv2d"]},
        {"groups": ["vgg16-b32"], "precisions": ["bfloat16"], "layouts": ["channels_last"], "modes": ["fwdbwd"]},
        {"groups": ["vgg16-b128"], "precisions": ["bfloat16"], "layouts": ["nchw"], "modes": ["fwdbwd"]},
        {"groups": ["vgg16-b128"], "precisions": ["float32"], "layouts": ["nchw"], "modes": ["fwdbwd"]}]},
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/kernels.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"layers: {', '.join(all_layers())}\nshape groups: {', '.join(GROUPS)}")
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on a CUDA device, else cpu")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--layers", type=csv, help="comma list (default: every layer)")
    p.add_argument("--backends", type=csv,
                   help="comma list of fusedcnn backends, or 'all' (default: every one available here; the "
                        "reference backend only on small shapes, triton only on CUDA)")
    p.add_argument("--precisions", "--dtypes", type=csv, help=f"override the preset's: {', '.join(PRECISIONS)}")
    p.add_argument("--layouts", type=csv, help=f"override the preset's: {', '.join(LAYOUTS)}")
    p.add_argument("--modes", type=csv, help=f"override the preset's: {', '.join(MODES)}")
    p.add_argument("--groups", type=csv, help=f"override the preset's shape groups: {', '.join(GROUPS)}")
    p.add_argument("--shapes", help="only cases whose shape label contains this text (e.g. conv3_1)")
    p.add_argument("--limit-shapes", type=int, help="at most this many shapes per layer and group (smoke runs)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="also time each case from a CUDA graph (default: the preset's choice)")
    p.add_argument("--time-budget", type=float, help="seconds; cases not started by then are listed as skipped")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke runs)")
    p.add_argument("--check-only", action="store_true",
                   help="correctness against the float64 golden only, no timing (e.g. under compute-sanitizer)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the preset's; cpu presets use 1)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device-tag>/)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--list", action="store_true", help="list the cases the options select, then exit")
    args = p.parse_args(argv)
    for name, allowed in (("layers", all_layers()), ("precisions", PRECISIONS), ("layouts", LAYOUTS),
                          ("modes", MODES), ("groups", GROUPS)):
        bad = [v for v in getattr(args, name) or [] if v not in allowed]
        if bad:
            p.error(f"unknown {name}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    if args.backends and args.backends != ["all"]:
        bad = [b for b in args.backends if b not in FUSED_BACKENDS]
        if bad:
            p.error(f"unknown backends: {', '.join(bad)} (choose from {', '.join(FUSED_BACKENDS)}; torch is "
                    "always the baseline)")
    return args


# ---------------------------------------------------------------- what to run
def expand(preset: dict, args, device: torch.device) -> list[tuple]:
    """The ordered, de-duplicated configurations (case, precision, layout, mode, graph)."""
    configs, seen = [], set()
    for plan in preset["plans"]:
        plan = dict(plan)
        for key in ("groups", "precisions", "layouts", "modes"):
            if getattr(args, key):
                plan[key] = getattr(args, key)
        layers = plan.get("layers")
        if args.layers:
            layers = [x for x in args.layers if layers is None or x in layers]
        graph = args.graph if args.graph is not None else plan.get("graph", preset.get("graph", False))
        graph = graph and device.type == "cuda"
        per_layer = {}
        for case in all_cases(plan["groups"], layers):
            if args.shapes and args.shapes not in case.shape:
                continue
            per_layer[(case.layer, case.group)] = per_layer.get((case.layer, case.group), 0) + 1
            if args.limit_shapes and per_layer[(case.layer, case.group)] > args.limit_shapes:
                continue
            for prec in plan["precisions"]:
                if prec not in case.precisions or (prec == "tf32" and device.type != "cuda"):
                    continue  # TF32 only changes matmul/conv, and exists on NVIDIA GPUs only
                for layout in plan["layouts"]:
                    for mode in plan["modes"]:
                        key = (case.key, prec, layout, mode)
                        if key not in seen:
                            seen.add(key)
                            configs.append((case, prec, layout, mode, graph))
    return configs


def choose_backends(args, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {backend: why not}) for this device."""
    import fusedcnn
    explicit = args.backends and args.backends != ["all"]
    wanted = list(FUSED_BACKENDS) if not explicit else args.backends
    run, skipped = [], {}
    for b in wanted:
        if b == "auto":  # always runs: it measures the others (and torch) and takes the fastest correct one
            run.append(b)
            continue
        why = fusedcnn.backends.unavailable_reason(b, device.type)
        if why is None and b == "triton" and device.type == "cpu" and not explicit:
            why = "Triton on CPU runs only under the interpreter, a test tool; ask for it with --backends triton"
        if why:
            skipped[b] = why
        else:
            run.append(b)
    return run, skipped


def reference_on(case: Case, args) -> bool:
    """The reference backend is a readable oracle, not a fast path: by default it runs on the small
    groups only (on VGG16 shapes its unfold buffers take several GB and minutes)."""
    return bool(args.backends) or not case.group.startswith("vgg16")


# ---------------------------------------------------------------- one configuration
def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def build_set(case: Case, spec: Spec, mode: str) -> dict:
    """One input set; in fwd+bwd mode the leaves require grad and "grad_out" is added, with the same
    shape, dtype and strides (memory format) as torch's output."""
    t = case.build(spec)
    if mode == "fwdbwd":
        out = case.call(t, None).detach()
        t["grad_out"] = torch.empty_like(out).normal_(generator=spec.gen)
        del out
        for name in case.leaves:
            t[name].requires_grad_(True)
    return t


def as_float64(t: dict, leaves) -> dict:
    """A float64 copy of an input set (same strides; the leaves require grad): the golden's inputs."""
    out = {}
    for name, v in t.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(torch.float64).requires_grad_(name in leaves)
        out[name] = v
    return out


class Prepared:
    """A configuration ready to run: rotating input sets, the golden result on the first, the byte floor.

    The golden is torch's own call on a float64 copy of the first input set: every row, torch's
    included, is checked against it, so an inaccurate torch kernel (e.g. float32 channels_last
    BatchNorm backward on CPU, 20% off when the mean is large) shows as torch's error instead of
    flagging the backend that computed the right answer.
    """

    def __init__(self, case: Case, prec: str, layout: str, mode: str, device: torch.device):
        self.case, self.prec, self.layout, self.mode = case, prec, layout, mode
        gen = torch.Generator(device=device).manual_seed(_seed(case.key, prec, layout, mode))
        spec = Spec(device, PRECISIONS[prec], layout == "channels_last", gen)
        first = build_set(case, spec, mode)
        # Timing updates the running statistics of the sets in place: every check starts from these.
        self.state = {name: first[name].detach().clone() for name in case.mutable}
        self.golden = run_once(case, {**as_float64(first, case.leaves), **as_float64(self.state, ())}, None, mode)
        self.min_bytes = case.min_bytes(mode, {k: v for k, v in first.items() if k != "grad_out"},
                                        self.golden[0].to(first[case.leaves[0]].dtype))
        # rotate among enough sets to overflow the last-level cache twice (at most 64)
        set_bytes = sum(v.nbytes for v in first.values() if isinstance(v, torch.Tensor))
        nsets = max(1, min(64, math.ceil(2 * cache_bytes(device) / max(set_bytes, 1))))
        self.sets = [first] + [build_set(case, spec, mode) for _ in range(nsets - 1)]

    def check(self, backend: str | None) -> float:
        """Max relative error of one call of `backend` (None: torch) against the float64 golden."""
        got = run_once(self.case, {**self.sets[0], **self.state}, backend, self.mode)
        return compare(self.case, got, self.golden, self.sets[0])

    def fn(self, backend: str | None):
        return timed_fn(self.case, self.sets, backend, self.mode)


def run_once(case: Case, t: dict, backend: str | None, mode: str):
    """One call: (output, [gradients of the leaves] or None, [the mutated tensors after the call])."""
    t = dict(t)
    for name in case.mutable:
        t[name] = t[name].clone()
    inputs = {k: v for k, v in t.items() if k != "grad_out"}
    out = case.call(inputs, backend)
    grads = None
    if mode == "fwdbwd" and t.get("grad_out") is not None:
        grads = list(torch.autograd.grad(out, [t[n] for n in case.leaves], t["grad_out"]))
    return out.detach(), grads, [t[n] for n in case.mutable]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|; inf when shapes differ or NaN/inf appear where the reference has none."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach().float(), b.detach().float()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    scale = torch.where(torch.isfinite(b), b.abs(), torch.zeros_like(b)).max().clamp_min(1e-30)
    return float(diff.max() / scale) if diff.numel() else 0.0


def compare(case: Case, got, ref, t: dict) -> float:
    out, grads, mutated = got
    if case.check is not None:
        return case.check(out, t, t.get("grad_out"), grads)
    errs = [rel_err(out, ref[0])]
    if ref[1] is not None:
        errs += [rel_err(g, r) for g, r in zip(grads, ref[1])]
    errs += [rel_err(m, r) for m, r in zip(mutated, ref[2])]
    return max(errs)


def timed_fn(case: Case, sets: list[dict], backend: str | None, mode: str):
    """fn() for the timers: one call (fwd, or fwd + autograd backward) on the next input set."""
    state = {"i": 0}

    def fn():
        t = sets[state["i"] % len(sets)]
        state["i"] += 1
        out = case.call(t, backend)
        if mode == "fwdbwd":
            torch.autograd.grad(out, [t[n] for n in case.leaves], t["grad_out"])

    return fn


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def run_config(case, prec, layout, mode, graph, backends, timer, peaks, device, args) -> list[dict]:
    """Rows for one configuration: torch first (the baseline), then every backend."""
    base = {"layer": case.layer, "family": case.family, "group": case.group, "shape": case.shape,
            "count": case.count, "in_network": case.in_network, "precision": prec, "layout": layout,
            "mode": mode, "bound": case.bound, "flops": case.flops(mode), "tol": TOLERANCES[prec]}
    rows = []
    with precision(prec):
        try:
            prep = Prepared(case, prec, layout, mode, device)
        except torch.cuda.OutOfMemoryError:
            return [dict(base, backend=b, status="n/a", reason="out of memory") for b in ["torch", *backends]]
        floor_s = max(base["flops"] / (peaks["matmul_tflops"].get(prec, math.inf) * 1e12),
                      prep.min_bytes / ((peaks["copy_gbps"] or math.inf) * 1e9))
        timed = []  # (row, fn) of the backends that ran and are to be timed
        for backend in [None, *backends]:
            if backend == "reference" and not reference_on(case, args):
                continue
            row = dict(base, backend=backend or "torch", bytes=prep.min_bytes, sets=len(prep.sets))
            rows.append(row)
            try:
                if backend == "auto":  # the one-time measurement happens in this first call: report it
                    import fusedcnn
                    fusedcnn.autotune.reset()
                    t0 = time.perf_counter()
                    err = prep.check(backend)
                    row["auto_first_call_s"] = time.perf_counter() - t0
                    picked = fusedcnn.autotune.decisions()
                    row["auto_choice"] = "+".join(sorted({d.choice for d in picked})) or "static"
                    row["auto_cost_s"] = sum(d.cost_s for d in picked)
                else:
                    err = prep.check(backend)
                row["max_rel_err"] = err
                row["status"] = "ok" if err <= TOLERANCES[prec] else "WRONG"
                if not args.check_only:
                    timed.append((row, prep.fn(backend)))
            except Exception as e:
                _failed(row, e, device)
        # CPU: every backend of the configuration timed side by side (timer.side_by_side: interleaved rounds, so
        # a burst of other work on a shared machine lands on all of them alike); GPU: one after the other.
        if timed and device.type != "cuda":
            try:
                for (row, _), ms in zip(timed, timer.side_by_side([fn for _, fn in timed])):
                    row["ms"] = ms
            except Exception as e:
                for row, _ in timed:
                    _failed(row, e, device)
                timed = []
        for row, fn in timed:
            try:
                if "ms" not in row:
                    row["ms"] = timer.events(fn)
                if graph:
                    try:
                        row["graph_ms"] = timer.graph(fn, row["ms"])
                    except Exception as e:  # capture can fail (host syncs, CPU-side RNG, ...): say so
                        row["graph_reason"] = _reason(e)
                        sync_quietly(device)
            except Exception as e:
                _failed(row, e, device)
        torch_row = rows[0] if rows and rows[0]["backend"] == "torch" else {}
        for row in rows:
            ms = row.get("ms")
            if ms is None:
                continue
            row.update(tflops=base["flops"] / (ms * 1e-3) / 1e12, gbps=prep.min_bytes / (ms * 1e-3) / 1e9,
                       pct_peak=100.0 * floor_s / (ms * 1e-3))
            if row is not torch_row and row.get("status") == "ok":
                if torch_row.get("ms"):
                    row["speedup"] = torch_row["ms"] / ms
                if torch_row.get("graph_ms") and row.get("graph_ms"):
                    row["graph_speedup"] = torch_row["graph_ms"] / row["graph_ms"]
        del prep
    return rows


def _failed(row: dict, e: BaseException, device) -> None:
    """Mark a row that could not run or be timed: n/a (not implemented, out of memory) or error, with why."""
    row.pop("ms", None)
    if isinstance(e, NotImplementedError):
        row.update(status="n/a", reason=_reason(e))
    elif isinstance(e, torch.cuda.OutOfMemoryError):
        row.update(status="n/a", reason="out of memory")
    else:
        row.update(status="error", reason=f"{type(e).__name__}: {_reason(e)}")
        sync_quietly(device)


def sync_quietly(device):
    try:
        sync(device)
    except Exception:
        pass


# ---------------------------------------------------------------- report
COLUMNS = ["layer", "shape", "prec", "layout", "mode", "backend", "ms", "graph ms", "achieved", "%peak",
           "vs torch", "max rel err", "status"]


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        achieved = None
        if r.get("ms"):
            achieved = (f"{report.fmt(r['tflops'])} TFLOP/s" if r["bound"] == "compute"
                        else f"{report.fmt(r['gbps'])} GB/s")
        speed = r.get("speedup")
        if r.get("graph_speedup"):
            speed = f"{report.fmt(speed) if speed else ''} ({report.fmt(r['graph_speedup'])} graph)"
        status = r["status"] if r["status"] in ("ok", "WRONG") else f"{r['status']} ({r.get('reason', '')})"
        if r.get("auto_choice"):
            status += f"; auto: {r['auto_choice']} (measured in {report.fmt(r['auto_cost_s'] * 1e3)} ms)"
        if r.get("graph_reason"):
            status += f"; graph n/a ({r['graph_reason']})"
        out.append([r["layer"], r["shape"], r["precision"], "NHWC" if r["layout"] == "channels_last" else "NCHW",
                    r["mode"], r["backend"], report.fmt(r.get("ms")), report.fmt(r.get("graph_ms")), achieved,
                    report.fmt(r.get("pct_peak"), 2) if r.get("pct_peak") else None,
                    speed if isinstance(speed, str) else report.fmt(speed),
                    report.fmt(r.get("max_rel_err"), 2) if "max_rel_err" in r else None,
                    "**WRONG**" if status == "WRONG" else status])
    return out


def summary(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per layer x backend: geometric-mean speedup over the correct results; per network configuration:
    the time of the layer's whole VGG16 stack (each shape x its layer count; cases marked in_network)
    where every shape ran correctly."""
    per = {}
    for r in rows:
        if r["backend"] == "torch":
            continue
        s = per.setdefault((r["layer"], r["backend"]), {"layer": r["layer"], "backend": r["backend"], "logs": [],
                                                         "wrong": 0, "na": 0})
        if r.get("speedup"):
            s["logs"].append(math.log(r["speedup"]))
        elif r["status"] == "WRONG":
            s["wrong"] += 1
        elif r["status"] in ("n/a", "error"):
            s["na"] += 1
    layers = []
    for s in per.values():
        logs = s.pop("logs")
        s.update(cases=len(logs), geomean=math.exp(sum(logs) / len(logs)) if logs else None,
                 best=math.exp(max(logs)) if logs else None, worst=math.exp(min(logs)) if logs else None)
        layers.append(s)
    stacks = {}
    for r in rows:
        if not r.get("in_network", True):
            continue
        k = (r["layer"], r["group"], r["precision"], r["layout"], r["mode"], r["backend"])
        st = stacks.setdefault(k, {"ms": 0.0, "shapes": 0, "ok": True})
        st["shapes"] += 1
        if r.get("ms") and r["status"] == "ok":
            st["ms"] += r["ms"] * r["count"]
        else:
            st["ok"] = False
    totals = []
    for (layer, group, prec, layout, mode, backend), st in stacks.items():
        base = stacks.get((layer, group, prec, layout, mode, "torch"))
        if backend == "torch" or not st["ok"] or not base or not base["ok"]:
            continue
        totals.append({"layer": layer, "group": group, "precision": prec, "layout": layout, "mode": mode,
                       "backend": backend, "ms": st["ms"], "torch_ms": base["ms"], "speedup": base["ms"] / st["ms"]})
    return layers, totals


def markdown(header: dict, rows: list[dict], layers: list[dict], totals: list[dict], notes: list[str]) -> str:
    env, peaks = header["env"], header["peaks"]
    peak_txt = ", ".join(f"{p} {report.fmt(v)} TFLOP/s" for p, v in peaks["matmul_tflops"].items())
    parts = [f"# Kernel benchmarks ({header['preset']})", "", report.stamp_line(env), "",
             (f"Measured peaks: matmul {peaks['matmul_n']}^3 {peak_txt}; device copy "
              f"{report.fmt(peaks['copy_gbps'])} GB/s (bytes read + written)." if peaks["copy_gbps"] else
              "Correctness only (--check-only): no timing."), "",
             "How to read: `ms` time per call (GPU: median of CUDA events via triton.testing.do_bench; CPU: "
             "the backends of a row group timed side by side in interleaved rounds of ~1 ms blocks, each its "
             "fastest block); `graph ms` from CUDA-graph replay; `achieved` over the minimum "
             "FLOPs (conv: 2 per multiply-add; fwd+bwd = 3x fwd) or minimum bytes (each input read once, each "
             "output written once; the backward reads grad_out and the saved tensors named in "
             "benchmarks/cases); `%peak` = roofline floor max(FLOPs/matmul peak, bytes/copy bandwidth) over "
             "the time; `vs torch` = torch time / backend time (>1 is faster); `max rel err` = max|a-b|/max|b| "
             "against the golden, torch's call in float64 on the same inputs (torch's own rows too), "
             f"over output, gradients and running stats, WRONG above {TOLERANCES} "
             "(never ranked).", ""]
    parts += [f"- {n}" for n in notes]
    if layers:
        parts += ["", "## Summary: speedup against torch per layer (correct results only)", "",
                  report.md_table(["layer", "backend", "cases", "geomean", "best", "worst", "WRONG", "n/a"],
                                  [[s["layer"], s["backend"], s["cases"], report.fmt(s["geomean"]),
                                    report.fmt(s["best"]), report.fmt(s["worst"]), s["wrong"], s["na"]]
                                   for s in layers])]
    if totals:
        parts += ["", "## Whole VGG16 layer stacks (each shape x its count in the network)", "",
                  report.md_table(["layer", "group", "prec", "layout", "mode", "backend", "ms", "torch ms",
                                   "vs torch"],
                                  [[t["layer"], t["group"], t["precision"], t["layout"], t["mode"], t["backend"],
                                    report.fmt(t["ms"]), report.fmt(t["torch_ms"]), report.fmt(t["speedup"])]
                                   for t in totals])]
    parts += ["", "## All cases", "", report.md_table(COLUMNS, table_rows(rows)), ""]
    return "\n".join(parts)


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Speedup bars per layer (one panel each), one bar per backend per case; correct results only."""
    plt = report.pyplot()
    ok = [r for r in rows if r.get("speedup")]
    if plt is None or not ok:
        return None
    layers = list(dict.fromkeys(r["layer"] for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    fig, axes = plt.subplots(len(layers), 1, figsize=(12, 4.2 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        mine = [r for r in ok if r["layer"] == layer]
        labels = list(dict.fromkeys(_label(r) for r in mine))[:40]
        width = 0.8 / len(backends)
        for i, b in enumerate(backends):
            vals = {_label(r): r["speedup"] for r in mine if r["backend"] == b}
            ax.bar([j + i * width for j in range(len(labels))], [vals.get(lbl, 0) for lbl in labels], width,
                   label=b)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("speedup vs torch")
        ax.set_title(layer, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _label(r: dict) -> str:
    name = r["shape"].split(" ")[0].split("/")[0]  # first layer name of the shape (unique per layer)
    prec = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(r["precision"], r["precision"])
    return f"{name} {r['group']} {prec} {'NHWC' if r['layout'] == 'channels_last' else 'NCHW'} {r['mode']}"


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    configs = expand(preset, args, device)
    if args.list:
        for case, prec, layout, mode, graph in configs:
            print(f"{case.layer:20s} {case.group:11s} {case.shape:45s} {prec:9s} {layout:13s} {mode:6s}"
                  f"{' graph' if graph else ''}")
        return 0
    old_threads = torch.get_num_threads()
    threads = args.threads or (preset.get("threads") if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    quick = args.quick or preset.get("quick", False)
    timer = _timer(device, quick, preset)
    backends, unavailable = choose_backends(args, device)
    env = report.environment(device)
    notes = [f"{b}: not run ({why})" for b, why in unavailable.items()]
    if "reference" in backends and not args.backends:
        notes.append("reference: run on the small shape groups only (a readable oracle; pass --backends to "
                     "force it on VGG16 shapes)")
    precs = sorted({c[1] for c in configs}, key=list(PRECISIONS).index)
    print(f"fusedcnn kernel benchmarks, preset {preset_name}: {len(configs)} configurations x "
          f"(torch + {', '.join(backends) or 'no fusedcnn backend'}) on {report.stamp_line(env)}",
          file=sys.stderr)
    if args.check_only:
        peaks = {"matmul_tflops": {}, "matmul_n": None, "copy_gbps": None, "copy_bytes": None}
    else:
        print("measuring peaks (matmul, copy)...", file=sys.stderr)
        peaks = measure_peaks(device, precs, quick)
    header = {"kind": "kernels", "preset": preset_name, "env": env, "peaks": peaks, "backends": backends,
              "unavailable": unavailable, "tolerances": TOLERANCES, "quick": quick}
    out_dir = args.out or (report.RESULTS / report.device_tag(env))
    writer = report.Writer(out_dir, f"kernels-{preset_name}", header)
    budget = args.time_budget if args.time_budget is not None else preset.get("time_budget")
    start = time.monotonic()
    interrupted = skipped = 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    progress = _progress(configs, args.no_progress)
    try:
        for case, prec, layout, mode, graph in progress:
            if budget is not None and time.monotonic() - start > budget:
                skipped += 1
                continue
            if hasattr(progress, "set_description_str"):
                progress.set_description_str(f"{case.layer} {case.shape.split(' ')[0]} {prec} {layout} {mode}"[:60])
            for row in run_config(case, prec, layout, mode, graph, backends, timer, peaks, device, args):
                writer.add(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        interrupted = 1
        print("\ninterrupted: writing the results measured so far", file=sys.stderr)
    finally:
        if hasattr(progress, "close"):
            progress.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if skipped:
        notes.append(f"time budget of {budget:.0f} s reached: {skipped} of {len(configs)} configurations not run")
    if interrupted:
        notes.append("interrupted before the end: partial results")
    _write_results(writer, header, notes, time.monotonic() - start, None if args.no_plots else
                   f"fusedcnn {preset_name}: {report.stamp_line(env, wrap=True)}")
    torch.set_num_threads(old_threads)
    return 130 if interrupted else 0


def _timer(device: torch.device, quick: bool, preset: dict) -> Timer:
    """The Timer for the preset (its warm-up, repeat and minimum-run settings unless --quick)."""
    timer = Timer(device, quick)
    if not quick:
        timer.warmup_ms = preset.get("warmup_ms", timer.warmup_ms)
        timer.rep_ms = preset.get("rep_ms", timer.rep_ms)
        timer.cpu_min_run_s = preset.get("cpu_min_run_s", timer.cpu_min_run_s)
    return timer


def _write_results(writer, header: dict, notes: list, elapsed_s: float, plot_title: str | None) -> None:
    """JSON (rows, per-layer summary, stack totals), markdown and, with a title, the speedup PNG; prints the table."""
    layers, totals = summary(writer.rows)
    writer.header["notes"] = notes
    writer.write_json({"summary": layers, "stack_totals": totals, "elapsed_s": elapsed_s})
    text = markdown(header, writer.rows, layers, totals, notes)
    writer.write_md(text)
    png = plot(writer.rows, writer.path("-speedup.png"), plot_title) if plot_title is not None else None
    print(text)
    print(f"results: {writer.path('.json')}, {writer.path('.md')}" + (f", {png}" if png else ""), file=sys.stderr)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _progress(configs, disabled: bool):
    if disabled:
        return configs
    try:
        from tqdm import tqdm
    except ImportError:
        return configs
    return tqdm(configs, unit="case", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10,
                dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
