"""Train fusedcnn's VGG16 on MNIST / Fashion-MNIST: `python -m fusedcnn.train` or `fusedcnn train`.

Programmatic use (the benchmark harness calls this):

    from fusedcnn.train import TrainConfig, run
    metrics = run(TrainConfig(dataset="mnist-sample", backend="torch", width=1/16, resolution=32,
                              head="avgpool", steps=300, batch_size=64, output_dir=None))

What a run does: the dataset sits on the device as uint8 and every batch is augmented and resized there
(fusedcnn.data); a tqdm bar shows loss, accuracy and images/s; the validation set is scored after every
epoch; `<output-dir>/metrics.json` and `<output-dir>/checkpoint.pt` are rewritten atomically after every
epoch (temp file + os.replace). `--resume` restores model, optimizer, scheduler, AMP scaler, RNG states
and the position in the epoch, so an interrupted run ends with the same weights as an uninterrupted one.
Ctrl-C (SIGINT or SIGTERM) finishes the current step, saves a checkpoint and exits with status 130.
Everything random derives from --seed: same seed and backend, same result (on GPU add --deterministic).

Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel (NCCL on GPU, gloo on CPU);
--batch-size is the global batch, split evenly over the ranks, so the run computes the same thing on any
number of processes; BatchNorm statistics are reduced across ranks (BatchNormReLU2d(sync=True), via
convert(..., sync_bn=True)) unless --no-sync-bn; rank 0 alone logs and writes files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedcnn
from fusedcnn import backends
from fusedcnn.convert import convert
from fusedcnn.data import DATASETS, Dataset, load_dataset, make_batch, plan_epoch
from fusedcnn.models.vgg import HEADS, check_resolution, vgg16

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "plateau", "step", "onecycle")
AMP_MODES = ("none", "bf16", "fp16")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.01}
FAMILIES = ("conv", "batchnorm", "activation", "pooling", "dropout")
CHECKPOINT_FORMAT = 1
# Options that may differ between a run and its --resume (everything else must match the checkpoint).
# Options a --resume may change. backend too: every backend's model has the same state_dict keys and parameter
# order (vgg16's fused triton layout included), so a run can go on elsewhere, e.g. on CPU after a GPU run.
RESUMABLE_CHANGES = {"epochs", "steps", "output_dir", "resume", "progress", "data_root", "download", "log_every",
                     "checkpoint", "test", "eval_batch_size", "warmup_steps", "device", "threads", "backend",
                     "fused"}


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
    fused: bool | None = None                # triton's fused Conv+BN+ReLU layout; None: on for backend triton
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
        if self.batch_size < 2:
            raise ValueError("batch size must be at least 2: BatchNorm training needs more than one value per channel")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.fused and self.backend != "triton":
            raise ValueError(f"fused=True (the fused Conv+BN+ReLU layers) needs backend 'triton', got {self.backend!r}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {self.dropout}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by run(); untrusted input, so weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fusedcnn training checkpoint (format {CHECKPOINT_FORMAT})")
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
        raise ValueError("--resume: these options differ from the checkpoint's run (resume with the same "
                         "options; only epochs/steps and bookkeeping may change):\n  " + "\n  ".join(diffs))


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
    cfg = dataclasses.replace(config).validate()
    show = cfg.progress if progress is None else progress
    d, device = _setup_distributed(cfg.device)
    try:
        with _StopRequest() as stop:
            return _run(cfg, d, device, show, stop, callback)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, d: _Dist, device: torch.device, show: bool, stop: _StopRequest, callback) -> dict:
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.main else (lambda msg: None)
    if cfg.batch_size % d.world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {d.world} processes")
    if cfg.batch_size // d.world < 2:
        raise ValueError("each process needs a batch of at least 2 (BatchNorm training needs more than one "
                         "value per channel)")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    probe = torch.empty(0, device=device)
    try:  # which implementation each layer family gets here; an unusable backend fails now, clearly
        backends_used = {fam: backends.resolve(cfg.backend, probe, fam) for fam in FAMILIES}
    except RuntimeError as e:
        raise ValueError(str(e)) from None

    data: Dataset = load_dataset(cfg.dataset, cfg.data_root, cfg.download, device, log=say)
    train_x, train_y = data.train_x, data.train_y
    if cfg.train_samples is not None:
        train_x, train_y = train_x[: cfg.train_samples], train_y[: cfg.train_samples]
    if cfg.batch_size > len(train_y):
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set ({len(train_y)} images)")
    steps_per_epoch = len(train_y) // cfg.batch_size
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    resolutions = cfg.train_resolutions()

    model = vgg16(data.in_channels, data.num_classes, cfg.width, cfg.head, cfg.dropout, cfg.backend, cfg.fused)
    if d.world > 1 and cfg.sync_bn:
        model = convert(model, cfg.backend, sync_bn=True)
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = _make_scheduler(cfg, optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    # state that a checkpoint carries
    epoch, step_in_epoch, global_step = 0, 0, 0
    history = {"epochs": [], "loss_curve": [], "best_val_acc": None}
    out_dir = cfg.output_dir
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    if cfg.resume:
        path = ckpt_path if cfg.resume == "auto" else cfg.resume
        if path is None:
            raise ValueError("--resume auto needs an output dir")
        ckpt = load_checkpoint(path, map_location=device)
        _check_resume_config(ckpt["config"], cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, step_in_epoch, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        history = ckpt["history"]
        rng = ckpt["rng"]
        if len(rng) != d.world:
            say(f"fusedcnn: checkpoint has RNG states for {len(rng)} processes, this run has {d.world}: "
                f"dropout draws will differ from the original run")
        _set_rng_state(rng[d.rank % len(rng)], device)
        say(f"fusedcnn: resumed from {path} at epoch {epoch}, step {global_step}")
    if out_dir and d.main:
        os.makedirs(out_dir, exist_ok=True)

    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, mode=cfg.compile_mode)

    def save_checkpoint():
        rng = [_rng_state(device)]
        if d.world > 1:
            rng = [None] * d.world
            dist.all_gather_object(rng, {k: (v.cpu() if v is not None else None)
                                         for k, v in _rng_state(device).items()})
        if not (ckpt_path and cfg.checkpoint and d.main):
            return
        atomic_save({"format": CHECKPOINT_FORMAT, "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                     "global_step": global_step, "rng": rng, "history": history}, ckpt_path)

    local_b = cfg.batch_size // d.world
    shard = slice(d.rank * local_b, (d.rank + 1) * local_b)
    images_per_step = cfg.batch_size
    steady = {"start_step": global_step + cfg.warmup_steps, "time": 0.0, "images": 0}
    train_time, session_images = 0.0, 0
    interrupted = False
    bar = None
    if show and d.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=global_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    while global_step < total_steps and not interrupted:
        plan = plan_epoch(len(train_y), cfg.batch_size, cfg.seed, epoch, len(resolutions), cfg.augment, device)
        net.train()
        losses, correct = [], torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        _sync(device)
        t_epoch = seg_start = time.perf_counter()
        seg_images = 0
        while step_in_epoch < plan.steps and global_step < total_steps:
            # Ctrl-C: every process must stop at the same step (checked collectively every log_every steps)
            stop_now = stop.requested
            if d.world > 1:
                stop_now = False
                if global_step % cfg.log_every == 0:
                    stop_now = bool(d.all_reduce(torch.tensor([float(stop.requested)], device=device),
                                                 dist.ReduceOp.MAX).item())
            if stop_now:
                interrupted = True
                break
            if global_step == steady["start_step"]:
                _sync(device)
                seg_start, seg_images = time.perf_counter(), 0
            idx = plan.indices[step_in_epoch, shard]
            aug = plan.augment[step_in_epoch, shard] if plan.augment is not None else None
            x = make_batch(train_x[idx], resolutions[int(plan.resolution[step_in_epoch])], aug, cfg.channels_last)
            y = train_y[idx]
            with _autocast(cfg, device):
                out = net(x)
                loss = F.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if cfg.schedule == "onecycle":
                scheduler.step()
            losses.append(loss.detach())
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            step_in_epoch += 1
            global_step += 1
            seg_images += images_per_step
            session_images += images_per_step
            if bar is not None:
                bar.update(1)
                if global_step % cfg.log_every == 0 or step_in_epoch == plan.steps:
                    elapsed = time.perf_counter() - t_epoch
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{step_in_epoch * images_per_step / max(elapsed, 1e-9):.0f}")
            if callback is not None:
                callback({"step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch})
        _sync(device)
        t_end = time.perf_counter()
        epoch_time = t_end - t_epoch
        train_time += epoch_time
        if global_step > steady["start_step"]:
            steady["time"] += t_end - seg_start
            steady["images"] += seg_images

        # epoch bookkeeping: global loss curve and training accuracy (one all-reduce each)
        done_steps = len(losses)
        if done_steps:
            curve = d.all_reduce(torch.stack(losses).float()) / d.world
            totals = d.all_reduce(torch.stack([correct.double(), torch.tensor(float(seen), device=device,
                                                                              dtype=torch.float64)]))
            history["loss_curve"].extend(curve.tolist())
        epoch_done = step_in_epoch == plan.steps
        if done_steps and (epoch_done or global_step >= total_steps):
            val = _evaluate_all(model, data.val_x, data.val_y, cfg, d)
            lr = optimizer.param_groups[0]["lr"]
            if cfg.schedule == "plateau":
                scheduler.step(val["loss"])
            elif cfg.schedule == "step" and epoch_done:
                scheduler.step()
            record = {"epoch": epoch, "steps": global_step, "partial": not epoch_done,
                      "train_loss": sum(history["loss_curve"][-done_steps:]) / done_steps,
                      "train_acc": (totals[0] / totals[1]).item(), "val_loss": val["loss"], "val_acc": val["acc"],
                      "lr": lr, "time_s": epoch_time, "images_per_s": done_steps * images_per_step / epoch_time}
            if "acc_by_resolution" in val:
                record["val_acc_by_resolution"] = val["acc_by_resolution"]
            history["epochs"].append(record)
            best = history["best_val_acc"]
            history["best_val_acc"] = val["acc"] if best is None else max(best, val["acc"])
            say(f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                f"val loss {val['loss']:.4f} acc {val['acc']:.4f} | {record['images_per_s']:.0f} img/s")
        if epoch_done:
            epoch, step_in_epoch = epoch + 1, 0
        if epoch_done or interrupted or global_step >= total_steps:
            save_checkpoint()
    if bar is not None:
        bar.close()

    metrics = {
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "fusedcnn_version": fusedcnn.__version__, "torch_version": torch.__version__,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": d.world, "backends_used": backends_used,
        "dataset": {"name": data.name, "source": data.source, "note": data.note,
                    **data.sizes(), "train_used": len(train_y)},
        "epochs": history["epochs"], "loss_curve": history["loss_curve"],
        "val_acc": history["epochs"][-1]["val_acc"] if history["epochs"] else None,
        "best_val_acc": history["best_val_acc"],
        "steps": global_step, "train_time_s": train_time, "interrupted": interrupted,
        # steady state: after the warm-up steps, validation excluded; a run shorter than that: the plain average
        "images_per_s": (steady["images"] / steady["time"] if steady["time"] > 0 else
                         session_images / train_time if train_time > 0 else None),
        "checkpoint": ckpt_path if (ckpt_path and cfg.checkpoint) else None,
    }
    if cfg.test and not interrupted:
        test = _evaluate_all(model, data.test_x, data.test_y, cfg, d)
        metrics.update(test_loss=test["loss"], test_acc=test["acc"])
        if "acc_by_resolution" in test:
            metrics["test_acc_by_resolution"] = test["acc_by_resolution"]
        say(f"test: loss {test['loss']:.4f} acc {test['acc']:.4f}")
    metrics["peak_memory_mb"], metrics["peak_memory_kind"] = _peak_memory(device)
    if out_dir and d.main:
        _atomic_write_json(metrics, os.path.join(out_dir, "metrics.json"))
    if interrupted:
        say(f"fusedcnn: interrupted at step {global_step}; checkpoint saved to {ckpt_path} "
            f"(continue with --resume)" if metrics["checkpoint"] else
            f"fusedcnn: interrupted at step {global_step} (no checkpoint: no output dir)")
    return metrics


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
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=c.dataset, choices=DATASETS)
    g.add_argument("--data-root", default=c.data_root,
                   help="torchvision-layout folder (<root>/MNIST/raw/...); default ./data, then offline fallbacks")
    g.add_argument("--download", action="store_true", help="fetch the dataset into --data-root (online)")
    g.add_argument("--train-samples", type=int, default=c.train_samples, help="use only the first N training images")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random rotation/translation")
    g = p.add_argument_group("model")
    g.add_argument("--backend", default=c.backend, choices=backends.CHOICES)
    g.add_argument("--width", type=float, default=c.width, help="channel multiplier (e.g. 0.0625 = 1/16)")
    g.add_argument("--head", default=c.head, choices=HEADS)
    g.add_argument("--dropout", type=float, default=c.dropout)
    g.add_argument("--resolution", type=int, default=c.resolution, help="training and evaluation image side")
    g.add_argument("--resolutions", type=_resolution_list, default=None,
                   help="mixed-resolution training, e.g. 32,48,64 (needs --head avgpool or maxpool)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--amp", default=c.amp, choices=AMP_MODES)
    g.add_argument("--unfused", dest="fused", action="store_const", const=False, default=None,
                   help="with --backend triton: separate Conv2d / BatchNormReLU2d / pool layers instead of the fused "
                        "ConvBNReLU2d layout (for comparing the two)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", default=c.compile_mode, help="torch.compile mode, e.g. max-autotune")
    g = p.add_argument_group("optimisation")
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
    g = p.add_argument_group("run")
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
    return p


def config_from_args(argv: list[str] | None = None, prog: str = "python -m fusedcnn.train") -> TrainConfig:
    args = vars(build_parser(prog).parse_args(argv))
    return TrainConfig(**args)


def main(argv: list[str] | None = None, prog: str = "python -m fusedcnn.train") -> int:
    """CLI entry point: 0 on success, 130 after Ctrl-C (checkpoint saved), 2 with a message on bad options."""
    parser = build_parser(prog)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        metrics = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    return 130 if metrics["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
