"""Train fusedcnn's VGG16 on MNIST / Fashion-MNIST: `python -m fusedcnn.train` or `fusedcnn train`.

Programmatic use (the benchmark harness calls this):

    from fusedcnn.train import TrainConfig, run
    metrics = run(TrainConfig(dataset="mnist-sample", backend="torch", width=1/16, resolution=32,
                              head="avgpool", steps=300, batch_size=64, output_dir=None))

or step by step with `Trainer` (what run() does inside its signal and process-group set-up):

    t = Trainer(config)                        # data, model, optimizer, scheduler, --resume
    loss, correct = t.train_step(x, y)         # one optimizer step
    t.finish_epoch(t.train_epoch())            # one epoch (or up to a stop request), validation, checkpoint
    metrics = t.fit()                          # the rest of the run, test set, metrics.json

What a run does: the dataset sits on the device as uint8 and every batch is augmented and resized there
(fusedcnn.data); a tqdm bar shows loss, accuracy and images/s; the validation set is scored after every
epoch; `<output-dir>/metrics.json` and `<output-dir>/checkpoint.pt` are rewritten atomically after every
epoch (temp file + os.replace). `--resume` restores model, optimizer, scheduler, AMP scaler, RNG states,
the position in the epoch and the epoch's running train loss/accuracy sums, so an interrupted run ends with
the same weights and the same per-epoch metrics as an uninterrupted one. A bad option, a missing dataset
or a checkpoint that cannot be used (empty, truncated, refused by torch.load(weights_only=True), another
run's) ends the CLI with status 2 and one line `<prog>: error: ...`.
Ctrl-C (SIGINT or SIGTERM) finishes the current step, saves a checkpoint and exits with status 130.
Everything random derives from --seed: same seed and backend, same result (on GPU add --deterministic).
The model runs its fusable layer runs (Conv+BatchNorm+ReLU[+pool], Linear+ReLU+Dropout) through the chosen
backend's fused functionals; --unfused runs every layer on its own. Either way, on every backend, the model
has the same modules and state_dict keys, so a checkpoint resumes with another backend or fused setting.

Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel (NCCL on GPU, gloo on CPU);
--batch-size is the global batch, split evenly over the ranks, so the run computes the same thing on any
number of processes; BatchNorm statistics are reduced across ranks (BatchNormReLU2d(sync=True), via
convert(..., sync_bn=True)) unless --no-sync-bn; rank 0 alone logs and writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedcnn
from fusedcnn import backends
from fusedcnn.convert import convert
from fusedcnn.data import DATASETS, DataUnavailableError, Dataset, load_dataset, make_batch, plan_epoch
from fusedcnn.models.vgg import HEADS, check_resolution, vgg16
from fusedcnn.ops import FAMILIES

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "plateau", "step", "onecycle")
AMP_MODES = ("none", "bf16", "fp16")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.01}
CHECKPOINT_FORMAT = 1
# Options a --resume may change (everything else must match the checkpoint). backend and fused too: the model
# has the same modules, state_dict keys and parameter order whichever backend runs it, fused or not, so a run
# can go on elsewhere, e.g. on CPU after a GPU run.
RESUMABLE_CHANGES = {"epochs", "steps", "output_dir", "resume", "progress", "data_root", "download", "log_every",
                     "checkpoint", "test", "eval_batch_size", "warmup_steps", "device", "threads", "backend",
                     "fused"}


class CheckpointError(ValueError):
    """A --resume checkpoint that cannot be used: empty, truncated, corrupted, refused by torch.load's
    weights_only unpickler, or written by a run whose options or model do not fit this one."""


# The failures of a run's set-up that are the user's to fix (options, data, checkpoint): the CLI reports them
# in one line and exits with status 2. Anything raised while training is a bug and keeps its traceback.
USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, DataUnavailableError)


@dataclass
class TrainConfig:
    """Every option of a training run; the CLI flags are these names with dashes."""
    # data
    dataset: str = "mnist"                   # mnist | fashion-mnist | mnist-sample
    data_root: str | None = None             # torchvision layout; None: ./data, then the offline fallbacks
    download: bool = False
    train_samples: int | None = None         # use only the first N training images (quick runs)
    augment: bool = True                     # random rotation +-15 deg, translation up to 10%
    # model
    backend: str = "auto"                    # torch | reference | triton | cpp | auto
    fused: bool = True                       # run Conv+BN+ReLU[+pool] / Linear+ReLU+Dropout fused (None: True)
    width: float = 1.0
    head: str = "classic"                    # classic (224x224) | avgpool | maxpool
    dropout: float = 0.5
    resolution: int = 224
    resolutions: tuple[int, ...] | None = None  # mixed-resolution training (global pooling head)
    channels_last: bool = False
    amp: str = "none"                        # none | bf16 | fp16
    compile: bool = False                    # torch.compile the model
    compile_mode: str | None = None          # e.g. "max-autotune"
    # optimisation
    epochs: int = 5
    steps: int | None = None                 # total optimizer steps; overrides epochs
    batch_size: int = 128                    # global batch (split over DDP ranks)
    eval_batch_size: int = 500
    optimizer: str = "adam"                  # adam | sgd
    lr: float | None = None                  # default: 1e-3 (adam), 0.01 (sgd)
    momentum: float = 0.9                    # sgd
    weight_decay: float = 0.0
    schedule: str = "none"                   # none | plateau | step | onecycle
    lr_step_size: int = 2                    # StepLR: epochs between decays
    lr_gamma: float = 0.1                    # StepLR and ReduceLROnPlateau factor
    plateau_patience: int = 1
    # reproducibility and bookkeeping
    seed: int = 0
    deterministic: bool = False              # deterministic GPU algorithms (CPU runs are always repeatable)
    device: str | None = None                # default: cuda if available, else cpu
    threads: int | None = None               # torch.set_num_threads (CPU); default: torch's choice
    sync_bn: bool = True                     # reduce BatchNorm statistics across DDP ranks
    output_dir: str | None = "runs/vgg16"    # None: write nothing
    checkpoint: bool = True                  # write <output_dir>/checkpoint.pt after every epoch
    resume: str | None = None                # a checkpoint path, or "auto" = <output_dir>/checkpoint.pt
    test: bool = True                        # score the test set at the end
    warmup_steps: int = 10                   # steps excluded from the steady-state images/s
    log_every: int = 20                      # steps between progress-bar updates (each one syncs the GPU)
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Check every option; ValueError with a clear message on the first bad one. Returns self."""
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}; "
                                 f"expected one of {', '.join(map(str, options))}")
        choice("dataset", DATASETS)
        choice("backend", backends.CHOICES)
        choice("head", HEADS)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("amp", AMP_MODES)
        for name in ("epochs", "batch_size", "eval_batch_size", "lr_step_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("steps", "train_samples"):
            if getattr(self, name) is not None and (not isinstance(getattr(self, name), int)
                                                    or getattr(self, name) < 1):
                raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("plateau_patience", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name.replace('_', ' ')} must be a non-negative integer, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:  # torch.manual_seed's range
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        for name in ("width", "dropout", "lr", "momentum", "weight_decay", "lr_gamma"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"{name.replace('_', ' ')} must be a finite number, got {v!r}")
        if self.batch_size < 2:
            raise ValueError("batch size must be at least 2: BatchNorm training needs more than one value per channel")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.fused is None:  # configs written when None meant "the backend's default"
            self.fused = True
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be True or False, got {self.fused!r}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.dropout}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"momentum and weight decay must be non-negative, got {self.momentum} and "
                             f"{self.weight_decay}")
        if not self.lr_gamma > 0:
            raise ValueError(f"lr gamma must be positive, got {self.lr_gamma}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"unknown device {self.device!r}; expected e.g. cpu, cuda or cuda:1") from None
        if self.resolutions is not None:
            self.resolutions = tuple(int(r) for r in self.resolutions)
            if not self.resolutions:
                raise ValueError("--resolutions needs at least one resolution")
            if self.head == "classic":
                raise ValueError("mixed resolutions (--resolutions) need a global pooling head: "
                                 "--head avgpool or --head maxpool")
        for r in self.train_resolutions():
            check_resolution(self.head, r, r)
        return self

    def train_resolutions(self) -> tuple[int, ...]:
        return self.resolutions if self.resolutions else (self.resolution,)


# ---------------------------------------------------------------- distributed set-up
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False   # this run initialised the process group (and tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t


def _setup_distributed(device_pref: str | None) -> tuple[_Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join (or reuse) the default process group."""
    if device_pref is not None:
        _check_device(torch.device(device_pref))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = (device_pref or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist(), torch.device(device_pref or ("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    d = _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)
    return d, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def _check_device(device: torch.device) -> None:
    """ValueError unless this machine has `device` (before anything is put on it)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available here (torch.cuda.is_available() "
                             f"is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except RuntimeError as e:
            raise ValueError(f"device {str(device)!r} is not usable here: {_first_sentence(e)}") from e


def _first_sentence(e) -> str:
    """The first sentence of an exception's message (or of a string) on one line, without terminal escapes."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    head = text.split(". ", 1)[0].rstrip(".")
    return head or (type(e).__name__ if isinstance(e, BaseException) else "no reason given")


def _one_line(e: BaseException) -> str:
    """An error message on one line (the CLI's `prog: error: ...`)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


# ---------------------------------------------------------------- checkpoints
def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# a checkpoint's entries and their types (epoch_sums: optional, absent before it was added)
_CHECKPOINT_KEYS = {"config": dict, "model": dict, "optimizer": dict, "scaler": dict, "epoch": int,
                    "step_in_epoch": int, "global_step": int, "rng": list, "history": dict}
_HISTORY_KEYS = {"epochs": list, "loss_curve": list}
_EPOCH_SUMS = ("loss_sum", "correct", "seen", "steps")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by run(); untrusted input, so weights_only=True. FileNotFoundError without a file;
    CheckpointError, in one line, for a file that is not a whole checkpoint of this format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:  # shown only if the file loads
        warnings.simplefilter("always")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except PermissionError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}") from e
        except pickle.UnpicklingError as e:  # the weights_only unpickler met more than tensors and plain values
            match = re.search(r"WeightsUnpickler error:\s*(.*?)(\n\s*\n|$)", str(e), re.S)
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) refused it "
                f"({_first_sentence(match.group(1) if match else e)}): not a checkpoint written by fusedcnn "
                f"train, which holds only tensors and plain values; nothing else is ever unpickled") from e
        except Exception as e:  # torch.load's reader fails on a damaged file in many ways: EOFError, the zip
            # reader's RuntimeError, OSError, KeyError, struct.error, ...; the file is the input, not the code
            raise CheckpointError(f"{path} is truncated or corrupted: torch.load failed with "
                                  f"{type(e).__name__}: {_first_sentence(e)}") from e
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fusedcnn training checkpoint (format {CHECKPOINT_FORMAT})")
    bad = [k for k, t in _CHECKPOINT_KEYS.items() if not isinstance(ckpt.get(k), t) or isinstance(ckpt.get(k), bool)]
    history = ckpt["history"] if isinstance(ckpt.get("history"), dict) else {}
    bad += [f"history[{k!r}]" for k, t in _HISTORY_KEYS.items() if not isinstance(history.get(k), t)]
    bad += [k for k in ("epoch", "step_in_epoch", "global_step") if k not in bad and ckpt[k] < 0]
    config = ckpt.get("config")
    if isinstance(config, dict) and not all(v is None or isinstance(v, (bool, int, float, str, list, tuple))
                                            for v in config.values()):  # compared with this run's options
        bad.append("config")
    sums = ckpt.get("epoch_sums")
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(sums.get(k), (int, float)) and not isinstance(sums.get(k), bool) and sums[k] >= 0
            for k in _EPOCH_SUMS)):
        bad.append("epoch_sums")
    if bad:
        raise CheckpointError(f"{path} is a damaged fusedcnn checkpoint: {', '.join(dict.fromkeys(bad))} "
                              f"missing or invalid")
    return ckpt


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ---------------------------------------------------------------- Ctrl-C
class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop reads between steps; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._saved = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._saved.clear()
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self._saved.get(signum, signal.default_int_handler))

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- the run
def _make_optimizer(cfg: TrainConfig, params):
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.lr_gamma,
                                                          patience=cfg.plateau_patience)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                   total_steps=total_steps)
    return None


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, resolution: int,
             cfg: TrainConfig, d: _Dist) -> tuple[float, float]:
    """(mean loss, accuracy) over uint8 `images`; each rank scores its contiguous share, then all-reduce."""
    model.eval()
    n = len(labels)
    lo, hi = d.rank * n // d.world, (d.rank + 1) * n // d.world
    sums = torch.zeros(2, dtype=torch.float64, device=images.device)  # loss sum, correct count
    for i in range(lo, hi, cfg.eval_batch_size):
        j = min(i + cfg.eval_batch_size, hi)
        x = make_batch(images[i:j], resolution, None, cfg.channels_last)
        with _autocast(cfg, x.device):
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), labels[i:j], reduction="sum")
        sums[1] += (out.argmax(1) == labels[i:j]).sum()
    d.all_reduce(sums)
    return (sums / n).tolist()


def _evaluate_all(model, images, labels, cfg, d) -> dict:
    """Loss and accuracy at each training resolution; the headline numbers are their means."""
    res = {r: evaluate(model, images, labels, r, cfg, d) for r in cfg.train_resolutions()}
    out = {"loss": sum(v[0] for v in res.values()) / len(res), "acc": sum(v[1] for v in res.values()) / len(res)}
    if len(res) > 1:
        out["acc_by_resolution"] = {str(r): v[1] for r, v in res.items()}
    return out


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    now = dataclasses.asdict(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
             if k not in RESUMABLE_CHANGES and _jsonable(saved.get(k)) != _jsonable(now[k])]
    if diffs:
        raise CheckpointError("--resume: these options differ from the checkpoint's run (resume with the same "
                              "options; only epochs/steps and bookkeeping may change):\n  " + ";\n  ".join(diffs))


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def run(config: TrainConfig, progress: bool | None = None,
        callback: Callable[[dict], None] | None = None) -> dict:
    """Train as `config` says; returns the metrics dict (also written to <output_dir>/metrics.json).

    callback(info) runs after every optimizer step with {"step", "epoch", "step_in_epoch"}.
    Metrics: config, device, backends_used (per layer family), dataset, epochs (per-epoch loss, accuracy,
    val loss/accuracy, lr, seconds, images/s), loss_curve (mean training loss of every step), val_acc,
    best_val_acc, test_acc, test_loss, images_per_s (steady state: after warmup_steps, validation
    excluded), train_time_s, peak_memory_mb (+ kind), steps, interrupted, checkpoint.
    """
    return _run(config, progress, callback)


@contextlib.contextmanager
def _setup_errors(handler: Callable[[Exception], None] | None):
    """Give the user-facing errors (USER_ERRORS) of the code inside to `handler` (the CLI's exit), if any."""
    try:
        yield
    except USER_ERRORS as e:
        if handler is not None:
            handler(e)
        raise


def _run(config: TrainConfig, progress: bool | None = None, callback: Callable[[dict], None] | None = None,
         setup_error: Callable[[Exception], None] | None = None) -> dict:
    """run(); `setup_error` receives the user-facing errors of the set-up (options, data, checkpoint), never
    those raised while training."""
    with _setup_errors(setup_error):
        cfg = dataclasses.replace(config).validate()
        d, device = _setup_distributed(cfg.device)
    show = cfg.progress if progress is None else progress
    try:
        with _StopRequest() as stop:
            with _setup_errors(setup_error):
                trainer = Trainer(cfg, d, device, show=show, stop=stop, callback=callback)
            return trainer.fit()
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _check_world(cfg: TrainConfig, d: _Dist) -> None:
    if cfg.batch_size % d.world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {d.world} processes")
    if cfg.batch_size // d.world < 2:
        raise ValueError("each process needs a batch of at least 2 (BatchNorm training needs more than one "
                         "value per channel)")


def _configure_torch(cfg: TrainConfig, device: torch.device) -> None:
    """Process-wide settings of a run: determinism, cuDNN autotuning, CPU threads, the seed."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def _resolve_backends(backend: str, device: torch.device, compiled: bool) -> dict:
    """Which implementation each layer family gets here ("auto (measured)": fusedcnn.autotune decides per layer
    call, metrics["autotune"] says what it chose); an unusable backend fails now, clearly."""
    probe = torch.empty(0, device=device)
    try:
        chosen = {fam: backends.choose(backend, probe, fam) for fam in FAMILIES}
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    measured = fusedcnn.autotune.enabled() and not compiled
    return {fam: name or ("auto (measured)" if measured else backends.static_choice(fam, probe))
            for fam, name in chosen.items()}


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _no_epoch_sums() -> dict:
    """Sums over an epoch's steps: loss_sum (of the per-step mean losses), correct and seen images, steps."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "steps": 0}


def _make_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output dir {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output dir {path!r}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"output dir {path!r} is not writable")


@dataclass
class EpochStats:
    """What Trainer.train_epoch measured: per-step losses (device tensors), correct predictions, images seen."""
    epoch: int
    plan_steps: int                  # steps in the whole epoch (the loop may stop before)
    losses: list = field(default_factory=list)
    correct: torch.Tensor | None = None
    seen: int = 0
    time_s: float = 0.0


class Trainer:
    """One training run, step by step. `run()` is `Trainer(...).fit()` inside the signal and process-group set-up.

    Construction does the set-up: seeds, resolves the backends, loads the data, builds model + optimizer +
    scheduler + AMP scaler (`build`), restores `cfg.resume` (`resume`), wraps the model for DDP / torch.compile
    (`net`). Then `train_step` (one optimizer step on a batch), `train_epoch` (the steps of one epoch, or up to a
    stop request), `finish_epoch` (loss curve, validation, schedule, checkpoint), `save_checkpoint`, `metrics`
    and `fit` (the whole run) can be called separately. `stop` is anything with a boolean `requested`; `d` and
    `device` default to a single process on cfg.device (else cuda if available, else cpu).
    """

    def __init__(self, cfg: TrainConfig, d: _Dist | None = None, device: torch.device | str | None = None, *,
                 show: bool = False, stop=None, callback: Callable[[dict], None] | None = None):
        self.cfg = cfg = dataclasses.replace(cfg).validate()
        self.d = d = d if d is not None else _Dist()
        self.device = torch.device(device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.show, self.callback = show, callback
        self.stop = stop if stop is not None else _StopRequest()  # not entered: a flag only
        self.say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.main else (lambda msg: None)
        _check_world(cfg, d)
        _check_device(self.device)
        _configure_torch(cfg, self.device)
        self.ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt") if cfg.output_dir else None
        resume_path = (self.ckpt_path if cfg.resume == "auto" else cfg.resume) if cfg.resume else None
        ckpt = self.read_checkpoint(resume_path) if cfg.resume else None  # a bad one fails before the data loads
        self.backends_used = _resolve_backends(cfg.backend, self.device, cfg.compile)
        self._load_data()
        self.resolutions = cfg.train_resolutions()
        self.build()
        # the state a checkpoint carries (besides model, optimizer, scheduler and scaler)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history = {"epochs": [], "loss_curve": [], "best_val_acc": None}
        self.epoch_sums = _no_epoch_sums()  # the current epoch's steps so far, over every session
        if ckpt is not None:
            self.resume(resume_path, ckpt)
        if cfg.output_dir and d.main:
            _make_output_dir(cfg.output_dir)
        self.net = self._wrap(self.model)
        # this session's bookkeeping
        self.interrupted = False
        self.train_time, self.session_images = 0.0, 0
        self.steady = {"start_step": self.global_step + cfg.warmup_steps, "time": 0.0, "images": 0}
        self.bar = None

    # ------------------------------------------------------------ set-up
    def _load_data(self) -> None:
        cfg = self.cfg
        self.data: Dataset = load_dataset(cfg.dataset, cfg.data_root, cfg.download, self.device, log=self.say)
        self.train_x, self.train_y = self.data.train_x, self.data.train_y
        if cfg.train_samples is not None:
            self.train_x, self.train_y = self.train_x[: cfg.train_samples], self.train_y[: cfg.train_samples]
        if cfg.batch_size > len(self.train_y):
            raise ValueError(f"batch size {cfg.batch_size} is larger than the training set "
                             f"({len(self.train_y)} images)")
        steps_per_epoch = len(self.train_y) // cfg.batch_size
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
        local_b = cfg.batch_size // self.d.world
        self.shard = slice(self.d.rank * local_b, (self.d.rank + 1) * local_b)  # this rank's part of a batch

    def build(self) -> None:
        """The model (on the device, sync BatchNorm under DDP), optimizer, scheduler and AMP grad scaler."""
        cfg, device = self.cfg, self.device
        model = vgg16(self.data.in_channels, self.data.num_classes, cfg.width, cfg.head, cfg.dropout,
                      cfg.backend, cfg.fused)
        if self.d.world > 1 and cfg.sync_bn:
            model = convert(model, cfg.backend, sync_bn=True)
        fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model = model.to(device, memory_format=fmt)
        self.optimizer = _make_optimizer(cfg, self.model.parameters())
        self.scheduler = _make_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        net = model
        if self.d.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            try:
                net = torch.compile(net, mode=self.cfg.compile_mode)
            except RuntimeError as e:  # torch.compile checks its arguments here; compiling waits for the first call
                raise ValueError(f"--compile-mode {self.cfg.compile_mode!r}: {_first_sentence(e)}") from e
        return net

    # ------------------------------------------------------------ checkpoints
    def read_checkpoint(self, path: str | None) -> dict:
        """The checkpoint at `path`, read and checked against this run's options (not yet restored):
        FileNotFoundError without a file, CheckpointError for a bad file or one of a different run."""
        if path is None:
            raise ValueError("--resume auto needs an output dir")
        ckpt = load_checkpoint(path, map_location=self.device)
        _check_resume_config(ckpt["config"], self.cfg)
        return ckpt

    def resume(self, path: str | None, ckpt: dict | None = None) -> None:
        """Continue from the checkpoint at `path` (`ckpt`: already read by read_checkpoint): it must come from
        a run with the same options and fit this model (CheckpointError otherwise)."""
        if ckpt is None:
            ckpt = self.read_checkpoint(path)
        try:
            self.load_state(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        self.say(f"fusedcnn: resumed from {path} at epoch {self.epoch}, step {self.global_step}")

    def load_state(self, ckpt: dict) -> None:
        """Restore everything `checkpoint_state` saved: weights, optimizer, scheduler, scaler, position, RNG,
        the epoch's partial sums. CheckpointError when a part does not fit this model and optimizer."""
        def restore(what: str, load, state) -> None:
            try:
                load(state)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # load_state_dict's complaints
                raise CheckpointError(f"its {what} does not fit this run ({_first_sentence(e)})") from e

        restore("model", self.model.load_state_dict, ckpt["model"])
        restore("optimizer state", self.optimizer.load_state_dict, ckpt["optimizer"])
        for p, state in self.optimizer.state.items():  # Optimizer.load_state_dict matches parameters by position only
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                    raise CheckpointError(f"its optimizer state does not fit this run ({k} of shape "
                                          f"{tuple(v.shape)} for a parameter of shape {tuple(p.shape)})")
        if self.scheduler is not None:
            restore("scheduler state", self.scheduler.load_state_dict, ckpt["scheduler"])
        restore("AMP grad scaler state", self.scaler.load_state_dict, ckpt["scaler"])
        rng = ckpt["rng"]
        if not rng or not all(isinstance(r, dict) and torch.is_tensor(r.get("cpu")) for r in rng):
            raise CheckpointError("its RNG states are missing or invalid")
        restore("RNG state", lambda r: _set_rng_state(r, self.device), rng[self.d.rank % len(rng)])
        if len(rng) != self.d.world:
            self.say(f"fusedcnn: checkpoint has RNG states for {len(rng)} processes, this run has {self.d.world}: "
                     f"dropout draws will differ from the original run")
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.history = ckpt["history"]
        self.epoch_sums = dict(ckpt.get("epoch_sums") or _no_epoch_sums())
        if "epoch_sums" not in ckpt and self.step_in_epoch:  # written before the sums were saved
            self.say(f"fusedcnn: this checkpoint predates per-epoch sums: epoch {self.epoch}'s train loss and "
                     f"accuracy will cover only the steps after step {self.step_in_epoch} of the epoch")

    def checkpoint_state(self, rng: list[dict]) -> dict:
        """The checkpoint (format CHECKPOINT_FORMAT); `rng`: every process's RNG states, by rank."""
        return {"format": CHECKPOINT_FORMAT, "config": _config_json(self.cfg),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "rng": rng, "history": self.history,
                "epoch_sums": dict(self.epoch_sums)}

    def save_checkpoint(self) -> None:
        """Write <output_dir>/checkpoint.pt atomically (rank 0). Collective under DDP: every rank calls it."""
        rng = [_rng_state(self.device)]
        if self.d.world > 1:
            rng = [None] * self.d.world
            dist.all_gather_object(rng, {k: (v.cpu() if v is not None else None)
                                         for k, v in _rng_state(self.device).items()})
        if self.ckpt_path and self.cfg.checkpoint and self.d.main:
            atomic_save(self.checkpoint_state(rng), self.ckpt_path)

    # ------------------------------------------------------------ training
    def batch(self, plan, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of step `i` of an epoch plan: (augmented, resized images, labels)."""
        idx = plan.indices[i, self.shard]
        aug = plan.augment[i, self.shard] if plan.augment is not None else None
        res = self.resolutions[int(plan.resolution[i])]
        return make_batch(self.train_x[idx], res, aug, self.cfg.channels_last), self.train_y[idx]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on (x, y): forward under autocast, backward through the grad scaler, optimizer
        (and OneCycle) step. Returns (loss, number correct) as device tensors, without a device sync.
        The model must be in training mode (train_epoch sets it)."""
        with _autocast(self.cfg, self.device):
            out = self.net(x)
            loss = F.cross_entropy(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.cfg.schedule == "onecycle":
            self.scheduler.step()
        return loss.detach(), (out.detach().argmax(1) == y).sum()

    def stop_requested(self) -> bool:
        """Ctrl-C: every process must stop at the same step (checked collectively every log_every steps)."""
        if self.d.world == 1:
            return bool(self.stop.requested)
        if self.global_step % self.cfg.log_every:
            return False
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        return bool(self.d.all_reduce(flag, dist.ReduceOp.MAX).item())

    def train_epoch(self) -> EpochStats:
        """The remaining steps of the current epoch, up to total_steps or a stop request (sets `interrupted`)."""
        cfg, device = self.cfg, self.device
        plan = plan_epoch(len(self.train_y), cfg.batch_size, cfg.seed, self.epoch, len(self.resolutions),
                          cfg.augment, device)
        self.net.train()
        stats = EpochStats(self.epoch, plan.steps, correct=torch.zeros((), device=device, dtype=torch.int64))
        _sync(device)
        t_epoch = seg_start = time.perf_counter()
        seg_images = 0
        while self.step_in_epoch < plan.steps and self.global_step < self.total_steps:
            if self.stop_requested():
                self.interrupted = True
                break
            if self.global_step == self.steady["start_step"]:
                _sync(device)
                seg_start, seg_images = time.perf_counter(), 0
            x, y = self.batch(plan, self.step_in_epoch)
            loss, correct = self.train_step(x, y)
            stats.losses.append(loss)
            stats.correct += correct
            stats.seen += len(y)
            self.step_in_epoch += 1
            self.global_step += 1
            seg_images += cfg.batch_size
            self.session_images += cfg.batch_size
            self._show_progress(stats, loss, t_epoch)
            if self.callback is not None:
                self.callback({"step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch})
        _sync(device)
        t_end = time.perf_counter()
        stats.time_s = t_end - t_epoch
        self.train_time += stats.time_s
        if self.global_step > self.steady["start_step"]:  # steady state: the steps after the warm-up
            self.steady["time"] += t_end - seg_start
            self.steady["images"] += seg_images
        return stats

    def _show_progress(self, stats: EpochStats, loss: torch.Tensor, t_epoch: float) -> None:
        """Advance the bar; every log_every steps (and at the epoch's end) show loss, accuracy, images/s."""
        if self.bar is None:
            return
        self.bar.update(1)
        if self.global_step % self.cfg.log_every == 0 or self.step_in_epoch == stats.plan_steps:
            elapsed = time.perf_counter() - t_epoch
            self.bar.set_postfix(epoch=self.epoch, loss=f"{loss.item():.4f}",
                                 acc=f"{stats.correct.item() / stats.seen:.3f}",
                                 img_s=f"{self.step_in_epoch * self.cfg.batch_size / max(elapsed, 1e-9):.0f}")

    def finish_epoch(self, stats: EpochStats) -> dict | None:
        """After train_epoch: extend the loss curve; validate and record the epoch if it (or the run) is done;
        step the schedule; move to the next epoch; checkpoint at an epoch's end, a stop or the last step.
        Returns the epoch's record (None when nothing was recorded)."""
        d, done_steps, record = self.d, len(stats.losses), None
        if done_steps:  # global loss curve and training accuracy: one all-reduce each
            curve = d.all_reduce(torch.stack(stats.losses).float()) / d.world
            seen = torch.tensor(float(stats.seen), device=self.device, dtype=torch.float64)
            totals = d.all_reduce(torch.stack([stats.correct.double(), seen])).tolist()
            losses = curve.tolist()
            self.history["loss_curve"].extend(losses)
            sums = self.epoch_sums  # the epoch so far, before this session too (restored by --resume)
            for loss in losses:  # one at a time: a resumed epoch adds in the same order as an uninterrupted one
                sums["loss_sum"] += loss
            sums["correct"] += round(totals[0])
            sums["seen"] += round(totals[1])
            sums["steps"] += done_steps
        epoch_done = self.step_in_epoch == stats.plan_steps
        if done_steps and (epoch_done or self.global_step >= self.total_steps):
            record = self._record_epoch(stats, epoch_done)
        if epoch_done:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.epoch_sums = _no_epoch_sums()
        if epoch_done or self.interrupted or self.global_step >= self.total_steps:
            self.save_checkpoint()
        return record

    def _record_epoch(self, stats: EpochStats, epoch_done: bool) -> dict:
        """The epoch's record: train loss and accuracy over all its steps so far (epoch_sums), validation,
        and this session's time and images/s."""
        done_steps, sums = len(stats.losses), self.epoch_sums
        val = self.validate()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.cfg.schedule == "plateau":
            self.scheduler.step(val["loss"])
        elif self.cfg.schedule == "step" and epoch_done:
            self.scheduler.step()
        record = {"epoch": stats.epoch, "steps": self.global_step, "partial": not epoch_done,
                  "train_loss": sums["loss_sum"] / sums["steps"],
                  "train_acc": sums["correct"] / sums["seen"], "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr,
                  "time_s": stats.time_s, "images_per_s": done_steps * self.cfg.batch_size / stats.time_s}
        if "acc_by_resolution" in val:
            record["val_acc_by_resolution"] = val["acc_by_resolution"]
        self.history["epochs"].append(record)
        best = self.history["best_val_acc"]
        self.history["best_val_acc"] = val["acc"] if best is None else max(best, val["acc"])
        self.say(f"epoch {stats.epoch}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                 f"val loss {val['loss']:.4f} acc {val['acc']:.4f} | {record['images_per_s']:.0f} img/s")
        return record

    # ------------------------------------------------------------ evaluation and the whole run
    def validate(self) -> dict:
        """{"loss", "acc"[, "acc_by_resolution"]} on the validation set (leaves the model in eval mode)."""
        return _evaluate_all(self.model, self.data.val_x, self.data.val_y, self.cfg, self.d)

    def test(self) -> dict:
        """{"loss", "acc"[, "acc_by_resolution"]} on the test set (leaves the model in eval mode)."""
        return _evaluate_all(self.model, self.data.test_x, self.data.test_y, self.cfg, self.d)

    def fit(self) -> dict:
        """Train to total_steps (or a stop request), score the test set, write metrics.json; the metrics."""
        if self.show and self.d.main:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        try:
            while self.global_step < self.total_steps and not self.interrupted:
                self.finish_epoch(self.train_epoch())
        finally:
            if self.bar is not None:
                self.bar.close()
        metrics = self.metrics()
        if self.cfg.test and not self.interrupted:
            test = self.test()
            metrics.update(test_loss=test["loss"], test_acc=test["acc"])
            if "acc_by_resolution" in test:
                metrics["test_acc_by_resolution"] = test["acc_by_resolution"]
            self.say(f"test: loss {test['loss']:.4f} acc {test['acc']:.4f}")
        metrics["peak_memory_mb"], metrics["peak_memory_kind"] = _peak_memory(self.device)
        metrics["autotune"] = fusedcnn.autotune.summary()  # the test's decisions too
        if metrics["autotune"]:
            self.say("fusedcnn: backend='auto' chose (per layer family: backend x call signatures) "
                     + "; ".join(f"{fam}: " + ", ".join(f"{b} x{n}" for b, n in sorted(s["choices"].items()))
                                 for fam, s in sorted(metrics["autotune"].items()))
                     + f"; measuring took {sum(s['cost_s'] for s in metrics['autotune'].values()):.2f} s "
                       "(fusedcnn.autotune_report() for the details)")
        self.write_metrics(metrics)
        if self.interrupted:
            self.say(f"fusedcnn: interrupted at step {self.global_step}; checkpoint saved to {self.ckpt_path} "
                     f"(continue with --resume)" if metrics["checkpoint"] else
                     f"fusedcnn: interrupted at step {self.global_step} (no checkpoint: no output dir)")
        return metrics

    def metrics(self) -> dict:
        """The run's metrics so far (fit adds the test scores and peak memory)."""
        cfg, d, data, device, steady = self.cfg, self.d, self.data, self.device, self.steady
        epochs = self.history["epochs"]
        return {
            "config": _config_json(cfg),
            "fusedcnn_version": fusedcnn.__version__, "torch_version": torch.__version__,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": d.world, "backends_used": self.backends_used,
            # what backend="auto" measured and chose per family (empty for a named backend)
            "autotune": fusedcnn.autotune.summary(),
            "dataset": {"name": data.name, "source": data.source, "note": data.note,
                        **data.sizes(), "train_used": len(self.train_y)},
            "epochs": epochs, "loss_curve": self.history["loss_curve"],
            "val_acc": epochs[-1]["val_acc"] if epochs else None,
            "best_val_acc": self.history["best_val_acc"],
            "steps": self.global_step, "train_time_s": self.train_time, "interrupted": self.interrupted,
            # steady state: after the warm-up steps, validation excluded; a run shorter than that: the plain average
            "images_per_s": (steady["images"] / steady["time"] if steady["time"] > 0 else
                             self.session_images / self.train_time if self.train_time > 0 else None),
            "checkpoint": self.ckpt_path if (self.ckpt_path and cfg.checkpoint) else None,
        }

    def write_metrics(self, metrics: dict) -> None:
        """<output_dir>/metrics.json, atomically, from rank 0 (nothing without an output dir)."""
        if self.cfg.output_dir and self.d.main:
            _atomic_write_json(metrics, os.path.join(self.cfg.output_dir, "metrics.json"))


# ---------------------------------------------------------------- command line
def _resolution_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,48,64, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one resolution")
    return values


def build_parser(prog: str = "python -m fusedcnn.train") -> argparse.ArgumentParser:
    """The CLI: one flag per TrainConfig field (dashes for underscores), same defaults."""
    c = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description="Train VGG16 (BatchNorm+ReLU after every conv) on "
                                "MNIST / Fashion-MNIST with fusedcnn layers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_options(p.add_argument_group("data"), c)
    _add_model_options(p.add_argument_group("model"), c)
    _add_optimisation_options(p.add_argument_group("optimisation"), c)
    _add_run_options(p.add_argument_group("run"), c)
    return p


def _add_data_options(g, c: TrainConfig) -> None:
    g.add_argument("--dataset", default=c.dataset, choices=DATASETS)
    g.add_argument("--data-root", default=c.data_root,
                   help="torchvision-layout folder (<root>/MNIST/raw/...); default ./data, then offline fallbacks")
    g.add_argument("--download", action="store_true", help="fetch the dataset into --data-root (online)")
    g.add_argument("--train-samples", type=int, default=c.train_samples, help="use only the first N training images")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random rotation/translation")


def _add_model_options(g, c: TrainConfig) -> None:
    g.add_argument("--backend", default=c.backend, choices=backends.CHOICES)
    g.add_argument("--width", type=float, default=c.width, help="channel multiplier (e.g. 0.0625 = 1/16)")
    g.add_argument("--head", default=c.head, choices=HEADS)
    g.add_argument("--dropout", type=float, default=c.dropout)
    g.add_argument("--resolution", type=int, default=c.resolution, help="training and evaluation image side")
    g.add_argument("--resolutions", type=_resolution_list, default=None,
                   help="mixed-resolution training, e.g. 32,48,64 (needs --head avgpool or maxpool)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--amp", default=c.amp, choices=AMP_MODES)
    g.add_argument("--unfused", dest="fused", action="store_const", const=False, default=c.fused,
                   help="run every layer on its own (plain nn.Sequential) instead of the fused Conv+BN+ReLU[+pool] "
                        "and Linear+ReLU+Dropout functionals of the chosen backend; same modules and state_dict, "
                        "any backend, for comparing the two (fused=%(default)s without this flag)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", default=c.compile_mode, help="torch.compile mode, e.g. max-autotune")


def _add_optimisation_options(g, c: TrainConfig) -> None:
    g.add_argument("--epochs", type=int, default=c.epochs)
    g.add_argument("--steps", type=int, default=c.steps, help="total optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=c.batch_size, help="global batch, split over DDP ranks")
    g.add_argument("--eval-batch-size", type=int, default=c.eval_batch_size)
    g.add_argument("--optimizer", default=c.optimizer, choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, default=c.lr, help="default 1e-3 (adam) / 0.01 (sgd)")
    g.add_argument("--momentum", type=float, default=c.momentum)
    g.add_argument("--weight-decay", type=float, default=c.weight_decay)
    g.add_argument("--schedule", default=c.schedule, choices=SCHEDULES,
                   help="plateau = ReduceLROnPlateau on val loss, step = StepLR, onecycle = OneCycleLR")
    g.add_argument("--lr-step-size", type=int, default=c.lr_step_size, help="StepLR period in epochs")
    g.add_argument("--lr-gamma", type=float, default=c.lr_gamma, help="StepLR / plateau decay factor")
    g.add_argument("--plateau-patience", type=int, default=c.plateau_patience)


def _add_run_options(g, c: TrainConfig) -> None:
    g.add_argument("--seed", type=int, default=c.seed)
    g.add_argument("--deterministic", action="store_true", help="deterministic GPU algorithms (slower)")
    g.add_argument("--device", default=c.device, help="default: cuda if available, else cpu")
    g.add_argument("--threads", type=int, default=c.threads, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under DDP, keep per-process BatchNorm statistics")
    g.add_argument("--output-dir", default=c.output_dir, help="checkpoint.pt and metrics.json go here")
    g.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default <output-dir>/checkpoint.pt)")
    g.add_argument("--no-test", dest="test", action="store_false", help="skip the final test-set evaluation")
    g.add_argument("--warmup-steps", type=int, default=c.warmup_steps,
                   help="steps left out of the steady-state images/s")
    g.add_argument("--log-every", type=int, default=c.log_every)
    g.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(argv: list[str] | None = None, prog: str = "python -m fusedcnn.train") -> TrainConfig:
    args = vars(build_parser(prog).parse_args(argv))
    return TrainConfig(**args)


def main(argv: list[str] | None = None, prog: str = "python -m fusedcnn.train") -> int:
    """CLI entry point: 0 on success, 130 after Ctrl-C (checkpoint saved). A bad option, dataset or checkpoint
    exits with status 2 and one line `<prog>: error: <what is wrong>` on stderr (argparse's style), no traceback."""
    parser = build_parser(prog)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))

    def fail(e: Exception) -> None:
        parser.exit(2, f"{prog}: error: {_one_line(e)}\n")

    metrics = _run(cfg, setup_error=fail)
    return 130 if metrics["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
