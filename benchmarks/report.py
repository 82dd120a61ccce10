"""What both harnesses write: the environment stamp, incremental JSON lines, JSON, markdown, PNG plots.

Every file is stamped with the device, torch/Triton/CUDA versions, the git commit and the date.
Rows are appended to <stem>.jsonl as they are measured (nothing is lost on Ctrl-C or a kill);
<stem>.json, <stem>.md and the plots are (re)written at the end, also after an interrupt.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """The stamp: device, versions, commit, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import fusedcnn
        backends = fusedcnn.available_backends(device.type)
    except Exception as e:  # the stamp must not fail because the package does
        backends = [f"fusedcnn failed to import: {e}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        detail = {"sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                  "capability": f"{props.major}.{props.minor}",
                  "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)}
    else:
        name = cpu_name()
        detail = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "device": name, "device_type": device.type, **detail,
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "git_commit": (commit + ("-dirty" if dirty else "")) if commit else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fusedcnn_backends": backends,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def device_tag(env: dict) -> str:
    """A folder name for the device: 'cuda-nvidia-h100-80gb-hbm3', 'cpu-intel-xeon-...'."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    return f"{env['device_type']}-{slug}"[:60].strip("-")


def stamp_line(env: dict, wrap: bool = False) -> str:
    """One line naming device, versions, commit and date (two lines with wrap=True, for plot titles)."""
    dev = env["device"] + (f" ({env['sm_count']} SMs, {env['memory_gib']} GiB)" if env["device_type"] == "cuda"
                           else f" ({env['threads']} threads)")
    parts = [f"device: {dev}", f"torch {env['torch']}", f"Triton {env['triton']}", f"CUDA {env['cuda']}"]
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    tail = f"commit {env['git_commit']} · {env['date']}"
    return " · ".join(parts) + ("\n" if wrap else " · ") + tail


class Writer:
    """Files of one run under `out_dir`: <stem>.jsonl as rows come, <stem>.json/.md at the end."""

    def __init__(self, out_dir: Path, stem: str, header: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self.header = header
        self.rows: list[dict] = []
        self.jsonl = self.dir / f"{stem}.jsonl"
        with open(self.jsonl, "w") as f:
            f.write(json.dumps({"header": header}) + "\n")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.log(row)

    def log(self, record: dict) -> None:
        """Append to <stem>.jsonl only (e.g. one seed of a run, as it finishes: kept if the run is interrupted)."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")

    def path(self, suffix: str) -> Path:
        return self.dir / f"{self.stem}{suffix}"

    def write_json(self, extra: dict) -> Path:
        p = self.path(".json")
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"header": self.header, **extra, "rows": self.rows}, indent=1,
                                  default=_json_default))
        tmp.replace(p)
        return p

    def write_md(self, text: str) -> Path:
        p = self.path(".md")
        p.write_text(text)
        return p


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - mag)}f}" if -3 <= mag < digits + 3 else f"{x:.{digits - 1}e}"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (plots are skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None
