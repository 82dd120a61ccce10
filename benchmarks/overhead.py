"""Per-call cost: forward+backward of one layer on a tiny tensor, fusedcnn against torch, CPU, one thread.

    python benchmarks/overhead.py                 # relu, max_pool2d, batch_norm_relu, conv2d on 2x8x4x4
    python benchmarks/overhead.py --backends cpp,auto --shape 8,16,8,8 --rounds 40

On a tiny tensor the kernels take a few microseconds: what is measured is the cost of a call -- Python
entry point, dispatch, "auto"'s signature lookup, the op call, autograd's node and the backward's call -- which
is what a small network pays per layer. Two tables, each layer and backend timed as
`x = x0.clone().requires_grad_(); layer(x).sum().backward()`:
  modules      the layers as a network calls them: fusedcnn.nn.ReLU / MaxPool2d / BatchNormReLU2d / Conv2d against
               torch.nn.ReLU / MaxPool2d / BatchNorm2d followed by ReLU / Conv2d (module call, training mode,
               running statistics and num_batches_tracked updated);
  functionals  fusedcnn.functional against torch.nn.functional (BatchNorm: F.batch_norm then F.relu).
Timed in interleaved rounds of --calls calls; each column keeps its fastest round (other processes on a shared
machine can only add time), with the ratio to torch's. Plain numbers; nothing is written to disk.
"""
from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LAYERS = ("relu", "max_pool2d", "batch_norm_relu", "conv2d")
LEVELS = ("modules", "functionals")


def _torch_modules(c: int) -> dict:
    bn, relu = torch.nn.BatchNorm2d(c), torch.nn.ReLU()
    return {"relu": torch.nn.ReLU(), "max_pool2d": torch.nn.MaxPool2d(2),
            "batch_norm_relu": lambda x: relu(bn(x)), "conv2d": torch.nn.Conv2d(c, c, 3, padding=1)}


def _fusedcnn_modules(c: int, backend: str) -> dict:
    import fusedcnn.nn as fnn
    return {"relu": fnn.ReLU(backend=backend), "max_pool2d": fnn.MaxPool2d(2, backend=backend),
            "batch_norm_relu": fnn.BatchNormReLU2d(c, backend=backend),
            "conv2d": fnn.Conv2d(c, c, 3, padding=1, backend=backend)}


def _functionals(c: int, backend: str | None) -> dict:
    """backend None = torch.nn.functional."""
    import fusedcnn.functional as FF
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(c, c, 3, 3, generator=gen).requires_grad_()
    b = torch.randn(c, generator=gen).requires_grad_()
    gamma, beta = (torch.rand(c, generator=gen) + 0.5).requires_grad_(), torch.randn(c, generator=gen).requires_grad_()
    running = [torch.zeros(c), torch.ones(c)]
    kw = {} if backend is None else {"backend": backend}
    f = F if backend is None else FF

    def bn_relu(x):
        if backend is None:
            return F.relu(F.batch_norm(x, *running, gamma, beta, training=True))
        return FF.batch_norm_relu(x, *running, gamma, beta, training=True, **kw)

    return {"relu": lambda x: f.relu(x, **kw), "max_pool2d": lambda x: f.max_pool2d(x, 2, **kw),
            "batch_norm_relu": bn_relu, "conv2d": lambda x: f.conv2d(x, w, b, padding=1, **kw)}


def layer_calls(shape: tuple[int, ...], backend: str | None, level: str = "functionals") -> dict:
    """{layer: a no-argument function running one forward+backward}; backend None = torch's own layers (torch.nn
    modules, or torch.nn.functional)."""
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    c = shape[1]
    if level == "modules":
        layers = _torch_modules(c) if backend is None else _fusedcnn_modules(c, backend)
    else:
        layers = _functionals(c, backend)

    def one(layer):
        def call():
            x = x0.clone().requires_grad_()
            layer(x).sum().backward()
        return call
    return {name: one(layer) for name, layer in layers.items()}


def table(level: str, shape: tuple[int, ...], names: list[str], rounds: int, calls: int) -> None:
    """Print one level's markdown table (columns: torch's layers, then each fusedcnn backend)."""
    base_name = "torch.nn" if level == "modules" else "torch.nn.functional"
    columns = {base_name: layer_calls(shape, None, level), **{b: layer_calls(shape, b, level) for b in names}}
    for fns in columns.values():  # warm-up: first calls, auto's measuring
        for fn in fns.values():
            fn()
    print(f"\n{level}: per-call cost, forward+backward, {'x'.join(map(str, shape))} float32, 1 thread, fastest of "
          f"{rounds} rounds of {calls} calls, microseconds (x {base_name}'s)")
    print("| layer | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for layer in LAYERS:
        best = {n: float("inf") for n in columns}
        for _ in range(rounds):
            for n, fns in columns.items():
                best[n] = min(best[n], timeit.timeit(fns[layer], number=calls) / calls * 1e6)
        base = best[base_name]
        print(f"| {layer} | " + " | ".join(f"{v:.1f}" + ("" if n == base_name else f" ({v / base:.2f}x)")
                                          for n, v in best.items()) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/overhead.py", description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="torch,cpp,auto", help="fusedcnn backends next to torch (default: %(default)s)")
    p.add_argument("--shape", default="2,8,4,4", help="N,C,H,W (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--calls", type=int, default=100, help="calls per round")
    p.add_argument("--level", choices=(*LEVELS, "both"), default="both",
                   help="time the nn modules, the functionals, or both (default: %(default)s)")
    args = p.parse_args(argv)
    import fusedcnn
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in names:
        if b != "auto" and fusedcnn.backends.unavailable_reason(b, "cpu"):
            p.error(f"backend {b}: {fusedcnn.backends.unavailable_reason(b, 'cpu')}")
    for level in (LEVELS if args.level == "both" else (args.level,)):
        table(level, shape, names, args.rounds, args.calls)
    if "auto" in names:
        print()
        print(fusedcnn.autotune_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
