"""backend="auto": the fastest backend measured for each layer call, chosen once per call signature.

As torch.backends.cudnn.benchmark does for cuDNN's algorithms: the first call of a layer family's method with a
new *signature* -- (method, grad mode, and per tensor argument: device, dtype, layout, shape with the batch size
rounded up to a power of two, requires_grad; the other arguments' values) -- runs every candidate backend on
clones of that call's arguments, keeps the ones that agree with torch, times them, and the fastest serves this
and every later call with the same signature.

Candidates: the backends available for the device and dtype (fusedcnn.backends), except `reference` (the
readable oracle, never fast) and Triton on CPU tensors (the interpreter). torch is always one of them.

The check (once per signature): outputs, input gradients (when the call records a graph: grad mode on and an
input requiring grad) and every tensor argument the call mutates (running statistics, in-place ReLU) against
torch's on the same clones, max |a - b| / max |b| within the dtype's tolerance (TOLERANCE); NaN where torch
has none fails. A candidate outside that tolerance gets a second opinion in float64 (torch's method on the
same values cast to float64): it passes when, tensor by tensor, its error from the float64 result is within
twice torch's own error or the tolerance -- the flash-attention rule. A ReLU or max-pool decision flipped by
rounding moves a whole gradient element, so two correct float32 kernels can differ by far more than the
tolerance (seen: torch's channels_last BatchNorm rounds differently from its NCHW one, 0.5 of 4.9 in one
element of a conv-BN-ReLU-pool input gradient). Methods that draw a dropout mask are checked against `reference`, which draws the same Philox
mask as triton and cpp (torch's mask comes from another stream), with the random state reset before each run.
A backend that raises or disagrees is rejected (autotune_report() says why).

The timing: forward, plus torch.autograd.grad of the outputs when the call records a graph; the candidates
run in interleaved rounds (at least 3, and about 10 ms per candidate; 2 when one round takes more than 10 ms;
CUDA synchronised around each run), each keeping its fastest run. A candidate must beat torch
by more than MARGIN to be chosen over it (noise on a shared machine must not flip choices).

No timing happens -- the static order (fusedcnn.backends) decides -- when:
  FUSEDCNN_AUTOTUNE=0; torch.compile / torch.export is tracing; a torch.func transform or forward-mode AD is
  active (ops/_registry.dispatch then runs torch anyway); the call carries something that cannot be cloned
  and replayed (a process group: sync BatchNorm; a deferred triton activation).

Distributed: with torch.distributed initialised over more than one process, rank 0 decides (measures, or reads
its cache) and broadcasts the decision; every rank uses it, so all ranks run the same kernels.

Cache: in memory for the process; on disk when FUSEDCNN_AUTOTUNE_CACHE names a JSON file (or
set_cache_file(path)): decisions are stored per stamp (fusedcnn, torch versions, device name and CPU threads),
written atomically after each new decision; a damaged file is ignored with a warning and rewritten.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from fusedcnn import backends

ENV_SWITCH = "FUSEDCNN_AUTOTUNE"
ENV_CACHE = "FUSEDCNN_AUTOTUNE_CACHE"
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
TF32_TOLERANCE = 5e-3  # float32 on CUDA when TF32 is allowed (torch's own conv/matmul may round to it)
MARGIN = 0.02  # a candidate must be this much faster than torch to replace it
_MIN_RUNS, _MAX_RUNS, _TARGET_S = 3, 25, 0.01


@dataclass
class Decision:
    """What "auto" chose for one call signature, and why."""
    family: str
    method: str
    signature: str  # the key, readable
    choice: str
    times_ms: dict = field(default_factory=dict)  # backend -> fastest run's ms (fwd, or fwd+bwd when grad)
    rejected: dict = field(default_factory=dict)  # backend -> why it was not a candidate
    cost_s: float = 0.0  # the one-time cost of checking and timing (0 when read from a cache)
    source: str = "measured"  # "measured" | "cache" | "rank 0" | "static" (measuring failed)


_decisions: dict[tuple, Decision] = {}  # bucketed signature -> decision
_seen: dict[tuple, Decision] = {}  # exact signature -> decision (the per-call lookup)
_cache_path: Optional[str] = None  # set_cache_file(); else FUSEDCNN_AUTOTUNE_CACHE
_disk: Optional[dict[str, dict]] = None  # this stamp's decisions read from the cache file, by signature
_timer_hook: Optional[Callable[[str, float], float]] = None  # tests: adjust a measured time (backend, seconds)
_memos: list[dict] = []  # memo()'s dicts, emptied by reset()


def enabled() -> bool:
    """Whether "auto" measures (FUSEDCNN_AUTOTUNE is not "0")."""
    value = backends.getenv(ENV_SWITCH)
    return value is None or value.strip() != "0"


def decisions() -> list[Decision]:
    """Every decision taken in this process, in the order taken."""
    return list(_decisions.values())


def reset() -> None:
    """Forget every decision (and the cache file's contents read so far); the file itself stays."""
    global _disk
    _decisions.clear()
    _seen.clear()
    for memo in _memos:
        memo.clear()
    _disk = None


def memo() -> dict:
    """A dict for what a caller derives from the decisions (ops/_registry: signature -> the chosen backend's
    method), emptied with them by reset()."""
    d: dict = {}
    _memos.append(d)
    return d


def set_cache_file(path: Optional[str]) -> None:
    """Keep decisions in the JSON file `path` too (None: only FUSEDCNN_AUTOTUNE_CACHE, if set)."""
    global _cache_path, _disk
    _cache_path, _disk = (os.fspath(path) if path is not None else None), None


# ---------------------------------------------------------------- the signature
def _bucket(n: int) -> int:
    return 0 if n == 0 else 1 << (n - 1).bit_length()


_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype})


_VECTOR = "(C,)"  # a 1-D tensor's stand-in for device, shape and strides in its signature part


def _parts(values) -> Optional[list]:
    """Each argument's part of a signature: a tensor's (dtype, device, shape, strides, requires_grad) -- strides
    give the layout --, a plain value itself, a list or tuple part by part; None when one cannot be cloned and
    replayed (a process group, a deferred activation). A 1-D tensor (a bias, BatchNorm's per-channel vectors) is
    (dtype, _VECTOR, requires_grad): in every family its length and device follow from the other tensors (a call
    where they do not fails on every backend), and the three attributes left out cost ~0.5 us a tensor a call."""
    parts = []
    for a in values:
        kind = type(a)
        if kind in _PLAIN:
            parts.append(a)
        elif isinstance(a, Tensor):
            if a.dim() == 1:
                parts.append((a.dtype, _VECTOR, a.requires_grad))
            else:  # a CPU tensor's device as "cpu" (prints the same): x.device builds a torch.device, ~0.3 us
                parts.append((a.dtype, "cpu" if a.is_cpu else a.device, a.shape, a.stride(), a.requires_grad))
        elif (kind is tuple or kind is list) and _PLAIN.issuperset(map(type, a)):
            parts.append(tuple(a))
        elif kind is tuple or kind is list:  # BatchNorm's (running_mean, ..., eps) bundle
            inner = _parts(a)
            if inner is None:
                return None
            parts.append(tuple(inner))
        else:
            return None
    return parts


def signature(family: str, method: str, args: tuple, kwargs: dict) -> Optional[tuple]:
    """The exact key of a call (it runs on every "auto" call: kept cheap); None when it cannot be replayed."""
    parts = _parts(args)
    if parts is None:
        return None
    if kwargs:
        rest = _parts(kwargs.values())
        if rest is None:
            return None
        parts += list(zip(kwargs, rest))
    return (family, method, torch.is_grad_enabled(), *parts)


def _is_tensor_part(p) -> bool:
    return type(p) is tuple and len(p) == 5 and isinstance(p[0], torch.dtype)


def bucketed(key: tuple) -> tuple:
    """The key a decision is stored under: the first tensor's (the activation's) batch size rounded up to a power
    of two, so a smaller last batch reuses the decision."""
    parts = list(key)
    for i, p in enumerate(parts[3:], 3):
        if _is_tensor_part(p) and len(p[2]):
            dtype, device, shape, strides, grad = p
            parts[i] = (dtype, device, (_bucket(shape[0]), *shape[1:]), strides, grad)
            break
    return tuple(parts)


def _readable(key: tuple) -> str:
    def show(p):
        if type(p) is tuple and len(p) == 3 and p[1] is _VECTOR:
            return f"{str(p[0]).replace('torch.', '')}[C]{' grad' if p[2] else ''}"
        if _is_tensor_part(p):
            dtype, device, shape, strides, grad = p
            nhwc = len(shape) == 4 and strides[1] == 1 and shape[1] > 1
            return f"{str(dtype).replace('torch.', '')}{list(shape)}{' nhwc' if nhwc else ''}" \
                   f"{' grad' if grad else ''}@{device}"
        if isinstance(p, tuple):
            return "(" + ", ".join(show(v) for v in p) + ")"
        return repr(p)
    family, method, grad_mode, *rest = key
    return f"{method}[{'grad' if grad_mode else 'no-grad'} mode](" + ", ".join(show(p) for p in rest) + ")"


# ---------------------------------------------------------------- cloning and running a call
def _clone(a, leaves: list, dtype: Optional[torch.dtype] = None):
    """a copy of a call argument (tensors inside lists and tuples too); floating tensors cast to dtype if given."""
    if isinstance(a, Tensor):
        c = a.detach().clone(memory_format=torch.preserve_format)
        if dtype is not None and c.is_floating_point():
            c = c.to(dtype)
        if a.requires_grad and a.is_floating_point():
            c.requires_grad_(True)
            leaves.append(c)
        return c
    if isinstance(a, (list, tuple)):
        return type(a)(_clone(v, leaves, dtype) for v in a)
    return a


def _outputs(out) -> list[Tensor]:
    """A call's result as a flat list of tensors (a deferred activation materialized)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    if hasattr(out, "materialize"):
        return [out.materialize()]
    return []


def _tensors(a) -> list[Tensor]:
    if isinstance(a, Tensor):
        return [a]
    if isinstance(a, (list, tuple)):
        return [t for v in a for t in _tensors(v)]
    return []


class _Trial:
    """One backend's method on fresh clones of a call's arguments: run it, and differentiate it when `grad`."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, grad: bool, dtype: Optional[torch.dtype] = None,
                 grad_outs: Optional[list[Tensor]] = None):
        self.fn, self.grad, self.leaves = fn, grad, []
        self.args = _clone(args, self.leaves, dtype)
        self.kwargs = {k: _clone(v, self.leaves, dtype) for k, v in kwargs.items()}
        self.grad_outs = None if grad_outs is None else [g.to(dtype or g.dtype) for g in grad_outs]

    def run(self):
        """(outputs, input gradients) of one call; the first input tensor is cloned first, so a call that
        writes its input in place (relu(inplace=True)) can be repeated (and a leaf is never written in place)."""
        args = list(self.args)
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            args[0] = args[0].clone()
        outs = _outputs(self.fn(*args, **self.kwargs))
        if not (self.grad and self.leaves):
            return outs, []
        diff = [o for o in outs if o.requires_grad]
        if self.grad_outs is None:
            gen = torch.Generator(device=diff[0].device if diff else "cpu").manual_seed(1234)
            # drawn in the logical (row-major) order, so that every candidate gets the same values whatever the
            # memory format of its output; then stored in that output's own format: an NCHW gradient for an NHWC
            # output would time a layout conversion in every candidate's backward (torch's 4x slower for a
            # channels_last ReLU)
            self.grad_outs = [torch.empty_like(o).copy_(torch.randn(o.shape, generator=gen, dtype=o.dtype,
                                                                    device=o.device)) for o in diff]
        grads = torch.autograd.grad(diff, self.leaves, self.grad_outs, allow_unused=True) if diff else []
        return outs, list(grads)

    def state(self) -> list[Tensor]:
        """The clones of every tensor argument (after a run: what the call mutated)."""
        return _tensors(self.args) + _tensors(tuple(self.kwargs.values()))


def _difference(a: Optional[Tensor], b: Optional[Tensor], same_dtype: bool = True) -> tuple[float, Optional[str]]:
    """(max |a - b| / max |b|, None), or (inf, why) when a and b cannot be compared (shape, dtype, NaN, indices).
    same_dtype=False: b is the float64 second opinion of a."""
    if a is None or b is None:
        return (0.0, None) if a is None and b is None else (float("inf"), "a gradient is missing")
    if a.shape != b.shape or (same_dtype and a.dtype != b.dtype):
        return float("inf"), f"shape/dtype {tuple(a.shape)} {a.dtype} instead of {tuple(b.shape)} {b.dtype}"
    if not a.is_floating_point():
        return (0.0, None) if torch.equal(a, b) else (float("inf"), "integer outputs (indices) differ")
    a64, b64 = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isnan(a64), torch.isnan(b64)):
        return float("inf"), "NaN where torch has none (or none where torch has one)"
    finite = ~torch.isnan(b64)
    if a64.numel() == 0 or not finite.any():
        return 0.0, None
    scale = b64[finite].abs().max().item() or 1.0
    return (a64 - b64)[finite].abs().max().item() / scale, None


def _error(a: Optional[Tensor], b: Optional[Tensor], tol: float) -> Optional[str]:
    """Why a differs from the golden b, or None."""
    err, why = _difference(a, b)
    return why if why else (None if err <= tol else f"max relative error {err:.2e} > {tol:.0e}")


def _tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32 and device.type == "cuda" and (
            torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return TF32_TOLERANCE
    return TOLERANCE.get(dtype, 1e-4)


def _snapshot(trial: _Trial) -> tuple[list, list, list]:
    """(outputs, gradients, tensor arguments after the call) of one run, copied: the timing runs that follow
    reuse the clones (running statistics go on moving). Empty outputs are left out (cpp's max_pool2d returns an
    empty indices tensor where torch returns none)."""
    outs, grads = trial.run()
    copy = lambda ts: [None if t is None else t.detach().clone() for t in ts]  # noqa: E731
    return copy([o for o in outs if o.numel() or o.is_floating_point()]), copy(grads), copy(trial.state())


_WHAT = ("output", "gradient", "mutated argument")


def _compare(result, golden, tol) -> Optional[str]:
    if any(len(a) != len(b) for a, b in zip(result, golden)):
        return "returns other outputs than torch"
    for what, xs, ys in zip(_WHAT, result, golden):
        for a, b in zip(xs, ys):
            why = _error(a, b, tol)
            if why:
                return f"{what}: {why}"
    return None


def _second_opinion(result, torch_result, float64_result, tol) -> Optional[str]:
    """Why a result that differs from torch's is wrong by the float64 rule (module docstring), or None."""
    for what, xs, ts, gs in zip(_WHAT, result, torch_result, float64_result):
        if len(ts) != len(gs):
            return "the float64 check returns other outputs"
        for a, t, g in zip(xs, ts, gs):
            err, why = _difference(a, g, same_dtype=False)
            torch_err, _ = _difference(t, g, same_dtype=False)
            if why:
                return f"{what}: {why}"
            if err > max(2 * torch_err, tol):
                return (f"{what}: max relative error {err:.2e} from float64, torch's {torch_err:.2e} "
                        f"(allowed: 2x torch's or {tol:.0e})")
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest_seconds(trials: dict, device: torch.device) -> tuple[dict, dict]:
    """({name: seconds}, {name: why it failed}) for the trials {name: _Trial}, timed in interleaved rounds (one run of
    each per round) until each has _MIN_RUNS runs and the round total reached _TARGET_S (at most _MAX_RUNS rounds;
    two when one round takes more than _TARGET_S). Each keeps its fastest run: on a shared machine other processes
    only ever add time, and a burst of them hits every candidate of a round alike instead of one candidate's whole
    timing window (timed one after the other, a burst made a 2.4x faster conv lose)."""
    times: dict[str, list] = {name: [] for name in trials}
    failed: dict[str, str] = {}
    rounds = 0
    while times and (rounds < _MIN_RUNS and sum(map(sum, times.values())) < 2 * _TARGET_S * len(times)
                     or rounds < _MAX_RUNS and sum(map(sum, times.values())) < _TARGET_S * len(times)):
        rounds += 1
        for name in list(times):
            try:
                _sync(device)
                t0 = time.perf_counter()
                trials[name].run()
                _sync(device)
            except Exception as e:  # noqa: BLE001 -- a backend that cannot serve this call is not a candidate
                if name == "torch":
                    raise
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                del times[name]
                continue
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}, failed


# ---------------------------------------------------------------- deciding
def _candidates(family: str, x: Tensor, extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """(the backends to check and time, torch first; {left out: why}). extra: the family's further candidates
    (registry.implement's extra=), measured only outside torch.distributed: they take decisions of their own
    while measured (per-layer: each layer's), which under distributed would broadcast out of step with the
    ranks waiting for this one."""
    device_type, out, rejected = x.device.type, [], {}
    for name in backends.BACKENDS:
        if name == "reference":
            rejected[name] = "the oracle, not a speed candidate"
        elif name == "triton" and device_type == "cpu":
            rejected[name] = "the Triton interpreter (CPU tensors)"
        elif backends.unavailable_reason(name, device_type) is not None:
            rejected[name] = backends.unavailable_reason(name, device_type)
        elif not backends.dtype_supported(name, device_type, family, x.dtype):
            rejected[name] = f"no {x.dtype} kernels for {family} on {device_type}"
        else:
            out.append(name)
    for name in extra:
        if _distributed():
            rejected[name] = "not measured under torch.distributed (it takes decisions of its own)"
        else:
            out.append(name)
    return out, rejected


def _measure(family: str, method: str, table: dict, args: tuple, kwargs: dict, x: Tensor, key: tuple,
             random: bool, extra: tuple[str, ...] = ()) -> Decision:
    start, before = time.perf_counter(), set(_decisions)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args) + _tensors(tuple(kwargs.values())))
    # the extra candidates (per-layer) only for calls that record a graph: they take a decision per layer while
    # measured, which tripled the one-time cost of a VGG16's evaluation passes for a forward that costs little
    names, rejected = _candidates(family, x, extra if grad else ())
    rejected.update({name: "measured for calls that record a graph (training) only" for name in extra if not grad})
    tol = _tolerance(x.dtype, x.device)
    devices = [x.device] if x.device.type == "cuda" else []
    trials: dict[str, _Trial] = {}  # the candidates that agree with torch (or reference), torch first
    with torch.random.fork_rng(devices=devices):  # the measuring draws no number the real call would have drawn
        rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

        def fresh_rng():
            torch.set_rng_state(rng[0])
            for d, s in zip(devices, rng[1]):
                torch.cuda.set_rng_state(s, d)

        golden = golden_trial = float64 = None
        for name in (["reference"] if random else []) + names:
            trial = _Trial(getattr(table[name], method), args, kwargs, grad)
            try:
                fresh_rng()
                result = _snapshot(trial)
                if golden is None:  # the first one run: torch, or reference for a dropout mask
                    golden, golden_trial = result, trial
                elif name != "torch":
                    why = _compare(result, golden, tol)
                    if why and not random and x.dtype != torch.float64:
                        if float64 is None:  # torch's method on the same values (and output gradients) in float64
                            float64 = _snapshot(_Trial(getattr(table["torch"], method), args, kwargs, grad,
                                                       torch.float64, golden_trial.grad_outs))
                        why = _second_opinion(result, golden, float64, tol)
                    if why:
                        rejected[name] = f"disagrees with {'reference' if random else 'torch'}: {why}"
                        continue
                if name != "reference":
                    trials[name] = trial
            except Exception as e:  # noqa: BLE001 -- a backend that cannot serve this call is not a candidate
                if name == "torch" or (random and name == "reference"):
                    raise
                rejected[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        times, failed = _fastest_seconds(trials, x.device)
        rejected.update(failed)
    if _timer_hook is not None:
        times = {name: _timer_hook(name, seconds) for name, seconds in times.items()}
    choice = min(times, key=lambda n: times[n] * (1.0 if n == "torch" else 1.0 + MARGIN))
    # decisions taken inside (a per-layer candidate's layers) report their own cost: not counted twice
    inner = sum(d.cost_s for k, d in _decisions.items() if k not in before)
    return Decision(family, method, _readable(key), choice, {n: round(s * 1e3, 4) for n, s in times.items()},
                    rejected, round(max(time.perf_counter() - start - inner, 0.0), 4))


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decide(family: str, method: str, table: dict, args: tuple, kwargs: dict, x: Tensor, key: tuple,
           random: bool, measure: Optional[Callable[[], Decision]] = None, extra: tuple[str, ...] = ()) -> str:
    """The backend for this call signature (key: signature()): from memory, the cache file, rank 0, or measured
    now (by _measure, or by `measure()` for a decision that is not a backend: the layout)."""
    decision = _seen.get(key)
    if decision is not None:
        return decision.choice
    exact, key = key, bucketed(key)
    decision = _decisions.get(key)
    if decision is not None:
        _seen[exact] = decision
        return decision.choice
    readable = _readable(key)
    if _distributed() and torch.distributed.get_rank() != 0:
        decision = None
    else:
        decision = _from_disk(readable)
        if decision is None:
            try:
                decision = (measure() if measure else
                            _measure(family, method, table, args, kwargs, x, key, random, extra))
                decision.signature = readable
            except Exception as e:  # noqa: BLE001 -- torch itself failed on these arguments: the real call says why
                static = LAYOUTS[0] if measure else backends.static_choice(family, x)
                decision = Decision(family, method, readable, static, source="static",
                                    rejected={"measuring": f"{type(e).__name__}: {e}"[:200]})
    if _distributed():
        box = [asdict(decision) if decision is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        decision = Decision(**box[0])
        if torch.distributed.get_rank() != 0:
            decision.source, decision.cost_s = "rank 0", 0.0
    _decisions[key] = _seen[exact] = decision
    if decision.source == "measured" and (not _distributed() or torch.distributed.get_rank() == 0):
        _save(readable, decision)
    return decision.choice


# ---------------------------------------------------------------- the memory format a FusedSequential runs in
LAYOUTS = ("contiguous", "channels_last")


def layout(module: torch.nn.Module, structure: str, x: Tensor, run: Callable[[Tensor, str], Tensor]) -> str:
    """The memory format ("contiguous" or "channels_last") in which `run(x, format)` -- a FusedSequential's
    forward over its children, on a 4-D NCHW input x -- is fastest; measured once per (structure, input signature, training, grad
    mode), as Inductor's layout optimisation decides for the convolutions of a graph. `run` converts the
    activations to it, and the output back: only the speed differs (every layer runs on backend "auto", each call of which is
    checked against torch in its own right).

    The measurement: the module's forward (and gradients of its parameters and x when grad mode records a graph)
    in each format, once to warm up (the layers' own decisions), then interleaved, the fastest of at least 3
    runs (as _fastest_seconds);
    its buffers (running statistics) are restored afterwards and the random state is forked, so measuring
    changes nothing a plain call would not. channels_last must win by MARGIN."""
    key = ("layout", "FusedSequential", torch.is_grad_enabled(), structure, module.training,
           (x.dtype, x.device, tuple(x.shape), x.stride(), x.requires_grad))
    decision = _seen.get(key)
    if decision is not None:
        return decision.choice
    return decide("layout", "FusedSequential", {}, (), {}, x, key, False,
                  measure=lambda: _measure_layout(module, x, run))


def _measure_layout(module: torch.nn.Module, x: Tensor, run: Callable[[Tensor, str], Tensor]) -> Decision:
    start, before = time.perf_counter(), set(_decisions)
    params = [p for p in module.parameters() if p.requires_grad]
    grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    devices = [x.device] if x.device.type == "cuda" else []
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    grad_out = None

    def once(name: str) -> float:
        nonlocal grad_out
        _sync(x.device)
        t0 = time.perf_counter()
        xi = x.detach().requires_grad_(x.requires_grad)
        out = run(xi, name)
        if grad and out.requires_grad:
            if grad_out is None:
                gen = torch.Generator(device=out.device).manual_seed(1234)
                grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
            leaves = params + ([xi] if x.requires_grad else [])
            torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
        _sync(x.device)
        return time.perf_counter() - t0

    try:
        with torch.random.fork_rng(devices=devices):
            for name in LAYOUTS:  # warm-up: the layers decide their backends for this format
                once(name)
            while min(len(t) for t in times.values()) < _MIN_RUNS or (
                    sum(map(sum, times.values())) < 2 * _TARGET_S and len(times[LAYOUTS[0]]) < _MAX_RUNS):
                for name in LAYOUTS:
                    times[name].append(once(name))
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
    fastest = {name: min(t) for name, t in times.items()}
    if _timer_hook is not None:
        fastest = {name: _timer_hook(name, s) for name, s in fastest.items()}
    choice = "channels_last" if fastest["channels_last"] * (1.0 + MARGIN) < fastest["contiguous"] else "contiguous"
    # the layers' decisions taken during the warm-ups report their own cost: not counted twice
    inner = sum(d.cost_s for k, d in _decisions.items() if k not in before)
    return Decision("layout", "FusedSequential", "", choice, {n: round(s * 1e3, 4) for n, s in fastest.items()},
                    {}, round(max(time.perf_counter() - start - inner, 0.0), 4))


# ---------------------------------------------------------------- the cache file
def _file() -> Optional[str]:
    return _cache_path or os.environ.get(ENV_CACHE) or None


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu")
    except OSError:
        model = "cpu"
    return model


def stamp() -> str:
    """What a cached decision is valid for: fusedcnn and torch versions, the device, CPU threads."""
    from fusedcnn import __version__
    return f"fusedcnn {__version__} | torch {torch.__version__} | {_device_name()} | {torch.get_num_threads()} threads"


def _read_file(path: str) -> dict:
    """The file's {stamp: {signature: decision}}; {} (with a warning) when it is damaged."""
    try:
        with open(path) as f:
            data = json.load(f)
        entries = data["decisions"]
        if data.get("format") != 1 or not isinstance(entries, dict) or not all(
                isinstance(v, dict) for v in entries.values()):
            raise ValueError("not a fusedcnn autotune cache (format 1)")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"fusedcnn: ignoring the damaged autotune cache {path} ({type(e).__name__}: {e}); "
                      "it will be rewritten", RuntimeWarning, stacklevel=2)
        return {}


def _from_disk(readable: str) -> Optional[Decision]:
    global _disk
    path = _file()
    if path is None:
        return None
    if _disk is None:
        _disk = _read_file(path).get(stamp(), {})
    record = _disk.get(readable)
    if not isinstance(record, dict):
        return None
    try:
        decision = Decision(**record)
    except TypeError:
        return None
    if decision.choice not in backends.BACKENDS:
        return None
    decision.source, decision.cost_s = "cache", 0.0
    return decision


def _save(readable: str, decision: Decision) -> None:
    path = _file()
    if path is None:
        return
    entries = _read_file(path)
    mine = entries.setdefault(stamp(), {})
    mine[readable] = asdict(decision)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": 1, "decisions": entries}, f, indent=1)
        os.replace(tmp, path)  # atomic: an interrupted write never leaves a half file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- the report
def report() -> str:
    """A table of every decision: the call signature, the choice, each candidate's time, why others were left out,
    and the one-time cost of measuring."""
    rows = decisions()
    if not rows:
        return "fusedcnn autotune: no decision yet" + ("" if enabled() else f" ({ENV_SWITCH}=0: static order)")
    lines = [f"fusedcnn autotune: {len(rows)} decision(s), measuring cost {sum(d.cost_s for d in rows):.3f} s in all"]
    for d in rows:
        times = ", ".join(f"{n} {ms:.3f} ms" for n, ms in sorted(d.times_ms.items(), key=lambda kv: kv[1]))
        lines.append(f"- {d.family}.{d.signature}: {d.choice} ({d.source}{'' if d.source != 'measured' else f', {d.cost_s:.3f} s'})"
                     + (f"; timed: {times}" if times else ""))
        for name, why in d.rejected.items():
            if not why.startswith(("the oracle", "the Triton interpreter")):
                lines.append(f"    {name}: {why}")
    return "\n".join(lines)


def summary() -> dict:
    """Per family: how many signatures each backend won, and the measuring cost (for the benchmark tables)."""
    out: dict[str, dict] = {}
    for d in decisions():
        fam = out.setdefault(d.family, {"choices": {}, "cost_s": 0.0})
        fam["choices"][d.choice] = fam["choices"].get(d.choice, 0) + 1
        fam["cost_s"] = round(fam["cost_s"] + d.cost_s, 4)
    return out
