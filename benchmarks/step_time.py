"""Training-step time of the cpu preset's VGG16, every run side by side in one process, interleaved.

    python benchmarks/step_time.py                       # torch, torch channels_last, cpp, auto, torch.compile
    python benchmarks/step_time.py --runs torch,auto --rounds 60 --batch 64

On a shared machine the speed of a whole e2e run moves by 20% between runs (benchmarks/NOTES.md): more than the
differences between backends. Here every model takes one training step in turn (forward, cross-entropy,
backward, Adam) on the same fixed batch, round after round, so all of them see the same machine; the table
gives each run's median and fastest step and its speed against torch eager's median. Runs:

  torch             torch.nn layers (fusedcnn backend "torch"), NCHW: the e2e baseline
  torch-nhwc        the same with model and input in channels_last (what a PyTorch user can do by hand)
  cpp, reference    that fusedcnn backend
  auto              backend "auto" (measured per layer; FusedSequential measures NCHW against NHWC activations)
  torch.compile     torch.compile of the torch model

The model is the e2e cpu preset's (width 1/8, 32x32, one input channel, average-pool head, no dropout); one
thread. Plain numbers; nothing is written to disk.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RUNS = ("torch", "torch-nhwc", "cpp", "auto", "torch.compile")


def make_step(run: str, x: torch.Tensor, y: torch.Tensor, width: float):
    """A no-argument function doing one training step of a fresh model (seed 0) for `run`."""
    from fusedcnn.models.vgg import vgg16
    torch.manual_seed(0)
    backend = {"torch-nhwc": "torch", "torch.compile": "torch"}.get(run, run)
    model = vgg16(1, 10, width=width, head="avgpool", backend=backend, dropout=0.0)
    if run == "torch-nhwc":
        model = model.to(memory_format=torch.channels_last)
        x = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)  # (N, 1, H, W): NHWC strides
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    forward = torch.compile(model) if run == "torch.compile" else model

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
    return step


def interleave(steps: dict, rounds: int, sync=lambda: None, progress: bool = True) -> dict[str, list[float]]:
    """{name: seconds of each of `rounds` calls of steps[name]()}: one call of every step in turn, round after
    round, so all of them see the same machine (`sync()` before each clock read: a CUDA synchronize). Ctrl-C
    ends it after the last complete round (every step then has the same number of calls)."""
    from tqdm import tqdm
    times: dict[str, list[float]] = {name: [] for name in steps}
    try:
        for _ in tqdm(range(rounds), desc="interleaved steps", leave=False, disable=not progress):
            this_round = {}
            for name, step in steps.items():
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                this_round[name] = time.perf_counter() - t0
            for name, seconds in this_round.items():
                times[name].append(seconds)
    except KeyboardInterrupt:
        if not any(times.values()):
            raise
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/step_time.py", description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=40, help="timed steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run first (compilation, auto's "
                                                             "measuring; default: %(default)s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--width", type=float, default=1 / 8)
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS and r != "reference"]
    if unknown or not runs:
        p.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}, reference")
    import fusedcnn
    from tqdm import tqdm
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, args.resolution, args.resolution, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    steps = {}
    for run in tqdm(runs, desc="build + warm-up", leave=False):
        steps[run] = make_step(run, x, y, args.width)
        for _ in range(args.warmup):
            steps[run]()
    times = interleave(steps, args.rounds)
    base = statistics.median(times["torch"]) if "torch" in times else None
    print(f"training step, width {args.width:g} VGG16, batch {args.batch}, {args.resolution}x{args.resolution}, "
          f"1 thread, {args.rounds} interleaved rounds, ms")
    print("| run | median | fastest | vs torch (median) |")
    print("|---|---|---|---|")
    for run, ts in times.items():
        med = statistics.median(ts)
        ratio = f"{base / med:.2f}x" if base else ""
        print(f"| {run} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {ratio} |")
    if "auto" in runs:
        summary = fusedcnn.autotune.summary()
        print("\nauto chose: " + "; ".join(f"{fam}: " + ", ".join(f"{b} x{n}" for b, n in sorted(s['choices'].items()))
                                         for fam, s in sorted(summary.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
