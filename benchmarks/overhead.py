"""Per-call cost: forward+backward of one layer on a tiny tensor, fusedcnn against torch, CPU, one thread.

    python benchmarks/overhead.py                 # relu, max_pool2d, batch_norm_relu, conv2d on 2x8x4x4
    python benchmarks/overhead.py --backends cpp,auto --shape 8,16,8,8 --rounds 40

On a tiny tensor the kernels take a few microseconds: what is measured is the cost of a call -- Python
entry point, dispatch, "auto"'s signature lookup, the op call, autograd's node and the backward's call -- which
is what a small network pays per layer. Per layer and backend (torch = torch.nn.functional called directly):
`x = x0.clone().requires_grad_(); layer(x).sum().backward()`, timed in interleaved rounds of --calls calls; the
table keeps each column's fastest round (other processes on a shared machine can only add time) and the ratio
to torch's. Plain numbers; nothing is written to disk.
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


def layer_calls(shape: tuple[int, ...], backend: str | None) -> dict:
    """{layer: a no-argument function running one forward+backward}; backend None = torch.nn.functional."""
    import fusedcnn.functional as FF
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen)
    c = shape[1]
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

    ops = {"relu": lambda x: f.relu(x, **kw), "max_pool2d": lambda x: f.max_pool2d(x, 2, **kw),
           "batch_norm_relu": bn_relu, "conv2d": lambda x: f.conv2d(x, w, b, padding=1, **kw)}

    def one(op):
        def call():
            x = x0.clone().requires_grad_()
            op(x).sum().backward()
        return call
    return {name: one(op) for name, op in ops.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/overhead.py", description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="torch,cpp,auto", help="fusedcnn backends next to torch (default: %(default)s)")
    p.add_argument("--shape", default="2,8,4,4", help="N,C,H,W (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--calls", type=int, default=100, help="calls per round")
    args = p.parse_args(argv)
    import fusedcnn
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in names:
        if b != "auto" and fusedcnn.backends.unavailable_reason(b, "cpu"):
            p.error(f"backend {b}: {fusedcnn.backends.unavailable_reason(b, 'cpu')}")
    columns = {"torch.nn.functional": layer_calls(shape, None), **{b: layer_calls(shape, b) for b in names}}
    for calls in columns.values():  # warm-up: first calls, auto's measuring
        for fn in calls.values():
            fn()
    print(f"per-call cost, forward+backward, {'x'.join(map(str, shape))} float32, 1 thread, fastest of "
          f"{args.rounds} rounds of {args.calls} calls, microseconds (x torch.nn.functional's)")
    print("| layer | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for layer in LAYERS:
        best = {n: float("inf") for n in columns}
        for _ in range(args.rounds):
            for n, calls in columns.items():
                best[n] = min(best[n], timeit.timeit(calls[layer], number=args.calls) / args.calls * 1e6)
        base = best["torch.nn.functional"]
        print(f"| {layer} | " + " | ".join(f"{v:.1f}" + ("" if n == "torch.nn.functional" else f" ({v / base:.2f}x)")
                                          for n, v in best.items()) + " |")
    if "auto" in names:
        print()
        print(fusedcnn.autotune_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
