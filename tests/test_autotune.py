"""backend="auto" measures: the decision per call signature, the correctness gate, the cache (memory and disk),
FUSEDCNN_AUTOTUNE=0, torch.compile, the random stream, and agreement across torch.distributed ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedcnn
import fusedcnn.functional as FF
from fusedcnn import autotune
from fusedcnn.ops import _registry

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("FUSEDCNN_BACKEND", raising=False)
    monkeypatch.delenv(autotune.ENV_SWITCH, raising=False)
    monkeypatch.delenv(autotune.ENV_CACHE, raising=False)
    autotune.reset()
    autotune.set_cache_file(None)
    yield
    autotune.reset()
    autotune.set_cache_file(None)


def _favour(monkeypatch, winner: str):
    """Make `winner` measure fastest (real timings of the others, 1000x longer)."""
    monkeypatch.setattr(autotune, "_timer_hook", lambda name, s: s if name == winner else s * 1000 + 1.0)


class _Candidate:
    """A stand-in compiled backend for the activation family: relu computed by `fn`."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def relu(self, x, inplace):
        self.calls += 1
        return self.fn(x)


@pytest.fixture
def stand_in(monkeypatch):
    """Put a stand-in backend in the activation table under the name "cpp" (always a candidate here)."""
    table = _registry._IMPLEMENTATIONS["activation"]

    def install(fn):
        cand = _Candidate(fn)
        monkeypatch.setitem(table, "cpp", cand)
        monkeypatch.setattr(autotune, "_candidates", lambda family, x, extra=(): (["torch", "cpp"], {}))
        return cand
    return install


def test_decides_once_per_signature_and_reuses_it(stand_in, monkeypatch):
    cand = stand_in(torch.relu)
    _favour(monkeypatch, "cpp")
    x = torch.randn(6, 3, 5, 5, requires_grad=True)
    y = FF.relu(x)
    torch.testing.assert_close(y, F.relu(x))
    (d,) = autotune.decisions()
    assert d.choice == "cpp" and d.family == "activation" and d.source == "measured"
    assert set(d.times_ms) == {"torch", "cpp"} and d.cost_s > 0
    calls = cand.calls
    FF.relu(torch.randn(8, 3, 5, 5, requires_grad=True))  # batch 8: the same bucket as 6 (rounded up to 8)
    assert len(autotune.decisions()) == 1 and cand.calls == calls + 1  # served, not measured again
    FF.relu(torch.randn(6, 4, 5, 5, requires_grad=True))  # another shape: a new decision
    FF.relu(torch.randn(6, 3, 5, 5))  # no gradient recorded: another signature
    FF.relu(torch.randn(6, 3, 5, 5, dtype=torch.float64, requires_grad=True))
    FF.relu(torch.randn(6, 3, 5, 5).to(memory_format=torch.channels_last).requires_grad_())
    assert len(autotune.decisions()) == 5
    text = fusedcnn.autotune_report()
    assert "activation.relu" in text and "cpp" in text and "float64" in text and "nhwc" in text


def test_reset_forgets_the_choice_each_call_reuses(stand_in, monkeypatch):
    # the per-call lookup keeps the chosen backend's method: reset() must empty it with the decisions
    cand = stand_in(torch.relu)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    _favour(monkeypatch, "cpp")
    FF.relu(x)
    calls = cand.calls
    FF.relu(x)
    assert cand.calls == calls + 1  # served by the stand-in
    autotune.reset()
    _favour(monkeypatch, "torch")
    FF.relu(x)
    (d,) = autotune.decisions()
    assert d.choice == "torch"
    calls = cand.calls
    FF.relu(x)
    assert cand.calls == calls  # served by torch now, not by the method kept before reset()


def test_a_wrong_candidate_is_never_chosen(stand_in, monkeypatch):
    stand_in(lambda x: torch.relu(x) * (1 + 1e-3))  # fast and 1e-3 off
    _favour(monkeypatch, "cpp")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    FF.relu(x).sum().backward()
    (d,) = autotune.decisions()
    assert d.choice == "torch" and "disagrees with torch" in d.rejected["cpp"] and "relative error" in d.rejected["cpp"]


def test_a_wrong_gradient_is_caught(stand_in, monkeypatch):
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.relu(x)

        @staticmethod
        def backward(ctx, g):
            return g  # the ReLU mask forgotten
    stand_in(WrongGrad.apply)
    _favour(monkeypatch, "cpp")
    FF.relu(torch.randn(4, 3, 5, 5, requires_grad=True))
    (d,) = autotune.decisions()
    assert d.choice == "torch" and "gradient" in d.rejected["cpp"]


def test_a_candidate_closer_to_float64_than_torch_passes_the_second_opinion(stand_in, monkeypatch):
    # torch's float32 result off by 2e-3 (as a ReLU mask flipped by rounding is), exact in float64: a candidate that
    # differs from torch but is within 2x torch's own float64 error is correct; one 3x further off is not
    table = _registry._IMPLEMENTATIONS["activation"]
    sloppy = _Candidate(lambda x: torch.relu(x + x.abs() * 2e-3 if x.dtype == torch.float32 else x))
    monkeypatch.setitem(table, "torch", sloppy)
    _favour(monkeypatch, "cpp")
    for off, chosen in ((0.0, "cpp"), (6e-3, "torch")):
        autotune.reset()
        stand_in(lambda x, off=off: torch.relu(x * (1 + off)))
        FF.relu(torch.randn(4, 3, 5, 5, requires_grad=True))
        (d,) = autotune.decisions()
        assert d.choice == chosen, d
    assert "from float64" in d.rejected["cpp"] and "2x torch's" in d.rejected["cpp"]


def test_the_gradient_check_does_not_depend_on_the_output_memory_format(stand_in, monkeypatch):
    # the timing gradient is drawn in logical order: a candidate returning NCHW where torch returns NHWC gets the
    # same gradient values (drawn per memory format, they differed and a correct candidate was rejected)
    stand_in(lambda x: torch.relu(x).contiguous())
    _favour(monkeypatch, "cpp")
    FF.relu(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last).requires_grad_())
    (d,) = autotune.decisions()
    assert d.choice == "cpp", d


def test_nan_where_torch_has_none_is_rejected(stand_in, monkeypatch):
    stand_in(lambda x: torch.where(x > 2.5, float("nan"), torch.relu(x)))
    _favour(monkeypatch, "cpp")
    FF.relu(torch.randn(4, 3, 8, 8) * 3)
    (d,) = autotune.decisions()
    assert d.choice == "torch" and "NaN" in d.rejected["cpp"]


def test_a_failing_candidate_falls_back(stand_in, monkeypatch):
    def boom(x):
        raise NotImplementedError("no kernel for this case (test)")
    stand_in(boom)
    _favour(monkeypatch, "cpp")
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(FF.relu(x), F.relu(x))
    (d,) = autotune.decisions()
    assert d.choice == "torch" and d.rejected["cpp"].startswith("NotImplementedError: no kernel")


def test_torch_wins_ties_within_the_margin(stand_in, monkeypatch):
    stand_in(torch.relu)
    monkeypatch.setattr(autotune, "_timer_hook", lambda name, s: 1.0 if name == "torch" else 1.0 - autotune.MARGIN / 2)
    FF.relu(torch.randn(4, 3, 5, 5))
    assert autotune.decisions()[0].choice == "torch"


def test_switched_off_uses_the_static_order(stand_in, monkeypatch):
    stand_in(torch.relu)
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    FF.relu(torch.randn(4, 3, 5, 5))
    assert autotune.decisions() == [] and "static order" in fusedcnn.autotune_report()


def test_explicit_backends_are_not_measured():
    FF.relu(torch.randn(4, 3), backend="torch")
    with fusedcnn.use_backend("reference"):
        FF.relu(torch.randn(4, 3))
    assert autotune.decisions() == []


def test_measuring_leaves_running_stats_and_inputs_as_one_call_would():
    x = torch.randn(8, 4, 6, 6)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = FF.batch_norm_relu(x.clone(), rm, rv, w, b, training=True, momentum=0.3)
    expect = F.relu(F.batch_norm(x.clone(), rm_t, rv_t, w, b, training=True, momentum=0.3))
    torch.testing.assert_close(y, expect)
    torch.testing.assert_close(rm, rm_t)  # updated once, by the real call only
    torch.testing.assert_close(rv, rv_t)
    assert len(autotune.decisions()) == 1
    x = torch.randn(4, 3, 5, 5)
    x_in = x.clone()
    out = FF.relu(x_in, inplace=True)  # in place: measured on clones, then applied once to x_in itself
    assert out is x_in and torch.equal(x_in, F.relu(x))


@pytest.mark.skipif("cpp" not in fusedcnn.available_backends("cpu"), reason="fusedcnn._C not built")
def test_dropout_is_checked_against_the_philox_mask_and_keeps_the_random_stream(monkeypatch):
    _favour(monkeypatch, "cpp")
    x = torch.randn(16, 32)
    torch.manual_seed(7)
    y_auto = FF.dropout(x, 0.5)  # measures first (inside a forked random state), then draws like one call
    (d,) = autotune.decisions()
    assert d.choice == "cpp", d.rejected  # cpp's mask equals reference's bit for bit
    torch.manual_seed(7)
    assert torch.equal(y_auto, FF.dropout(x, 0.5, backend="cpp"))


def test_the_cache_file_round_trip_and_a_damaged_file(tmp_path, stand_in, monkeypatch):
    stand_in(torch.relu)
    _favour(monkeypatch, "cpp")
    path = tmp_path / "tune" / "autotune.json"
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    FF.relu(torch.randn(4, 3, 5, 5))
    data = json.loads(path.read_text())
    (stamp,) = data["decisions"]
    assert stamp == autotune.stamp() and torch.__version__ in stamp and fusedcnn.__version__ in stamp
    autotune.reset()  # a new process, in effect

    def no_measuring(*a, **k):
        raise AssertionError("measured although the cache file had the decision")
    monkeypatch.setattr(autotune, "_measure", no_measuring)
    FF.relu(torch.randn(4, 3, 5, 5))
    (d,) = autotune.decisions()
    assert d.choice == "cpp" and d.source == "cache" and d.cost_s == 0.0
    monkeypatch.undo()  # measuring again; the stand-in gone

    path.write_text('{"format": 1, "decisions": {"x": ')  # an interrupted write from an older version
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    autotune.reset()
    with pytest.warns(RuntimeWarning, match="ignoring the damaged autotune cache"):
        FF.relu(torch.randn(4, 3, 5, 5))
    assert autotune.decisions()[0].source == "measured"
    assert json.loads(path.read_text())["format"] == 1  # rewritten whole


def test_a_cache_from_another_version_is_not_used(tmp_path, stand_in, monkeypatch):
    stand_in(torch.relu)
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    _favour(monkeypatch, "cpp")
    FF.relu(torch.randn(4, 3, 5, 5))
    data = json.loads(path.read_text())
    data["decisions"] = {"fusedcnn 0.0.1 | torch 1.0 | elsewhere | 1 threads": next(iter(data["decisions"].values()))}
    path.write_text(json.dumps(data))
    autotune.reset()
    _favour(monkeypatch, "torch")
    FF.relu(torch.randn(4, 3, 5, 5))
    (d,) = autotune.decisions()
    assert d.source == "measured" and d.choice == "torch"


def test_no_measuring_inside_torch_compile():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return FF.max_pool2d(FF.relu(x), 2)

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = f(x)
    y.sum().backward()
    torch.testing.assert_close(y, F.max_pool2d(F.relu(x), 2))
    assert autotune.decisions() == []


def test_calls_that_cannot_be_replayed_use_the_static_order():
    key = autotune.signature("batchnorm", "batch_norm", (torch.randn(2, 3, 4, 4), object()), {})
    assert key is None


def test_all_ranks_take_rank_0s_decision(tmp_path):
    """Two gloo processes whose timings disagree (rank 1 sees the stand-in as fastest, rank 0 sees torch): both
    use rank 0's decision."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "_autotune_ddp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["choices"] == ranks[1]["choices"] == ["torch", "torch"]
    assert ranks[0]["sources"] == ["measured", "measured"] and ranks[1]["sources"] == ["rank 0", "rank 0"]


# ---------------------------------------------------------------- the fused family's per-layer candidate
@pytest.mark.parametrize("winner", ["per-layer", "torch"])
def test_a_fused_run_can_run_each_layer_on_its_own_choice(monkeypatch, winner):
    """auto's "per-layer" candidate for a conv-BN-ReLU-pool run: each layer on its own "auto" decision (taken
    while it is measured), checked against torch like any candidate; chosen only when measured fastest."""
    monkeypatch.setattr(autotune, "_timer_hook", lambda name, s: s if name == winner else s * 1000 + 1.0)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 8, 8, generator=gen).requires_grad_()
    w = torch.randn(6, 3, 3, 3, generator=gen).requires_grad_()
    gamma, beta = torch.rand(6, generator=gen).add(0.5).requires_grad_(), torch.randn(6, generator=gen)
    stats = [torch.zeros(6), torch.ones(6)]
    want_stats = [t.clone() for t in stats]
    y = FF.conv_bn_relu(x, w, None, *stats, gamma, beta, True, 0.1, 1e-5, 1, 1, pool=True)
    (fused,) = [d for d in autotune.decisions() if d.family == "fused"]
    assert fused.choice == winner and "per-layer" in fused.times_ms, fused
    assert {d.family for d in autotune.decisions()} >= {"fused", "conv", "batchnorm", "pooling"}
    # one call's effect, whatever ran: output, gradients and running statistics as torch's
    x2, w2, gamma2 = (t.detach().clone().requires_grad_() for t in (x, w, gamma))
    y2 = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x2, w2, None, 1, 1), *want_stats, gamma2, beta, True)), 2)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    g = torch.randn(y.shape, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w, gamma), g), torch.autograd.grad(y2, (x2, w2, gamma2), g),
                               rtol=1e-4, atol=1e-4)
    for got, want in zip(stats, want_stats):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the decision is reused: a second call measures nothing
    n = len(autotune.decisions())
    FF.conv_bn_relu(x, w, None, *stats, gamma, beta, True, 0.1, 1e-5, 1, 1, pool=True)
    assert len(autotune.decisions()) == n


def test_the_per_layer_candidate_is_measured_for_training_calls_only():
    x, w = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 3, 3)
    FF.conv_bn_relu(x, w, None, torch.zeros(6), torch.ones(6), None, None, True, 0.1, 1e-5, 1, 1)
    (fused,) = [d for d in autotune.decisions() if d.family == "fused"]
    assert "per-layer" not in fused.times_ms and "training" in fused.rejected["per-layer"]


def test_the_per_layer_candidate_is_not_measured_under_distributed(monkeypatch):
    monkeypatch.setattr(autotune, "_distributed", lambda: True)
    names, rejected = autotune._candidates("fused", torch.randn(2, 3, 4, 4), ("per-layer",))
    assert "per-layer" not in names and "distributed" in rejected["per-layer"]


# ---------------------------------------------------------------- the memory format a FusedSequential runs in
def _conv_stack(backend="auto"):
    import fusedcnn.nn as fnn
    torch.manual_seed(3)
    return fnn.FusedSequential(
        fnn.Conv2d(1, 6, 3, padding=1, bias=False, backend=backend), fnn.BatchNorm2d(6, backend=backend),
        fnn.ReLU(backend=backend), fnn.MaxPool2d(2, backend=backend),
        fnn.Conv2d(6, 8, 3, padding=1, backend=backend), fnn.BatchNormReLU2d(8, backend=backend))


def _plain_copy(model):
    import copy
    plain = torch.nn.Sequential(*copy.deepcopy(list(model.children())))
    with fusedcnn.use_backend("torch"):
        return plain


@pytest.mark.parametrize("winner", ["channels_last", "contiguous"])
def test_a_fused_sequential_runs_in_the_measured_memory_format(monkeypatch, winner):
    monkeypatch.setattr(autotune, "_timer_hook", lambda name, s: s if name == winner else s * 1000 + 1.0)
    model = _conv_stack()
    plain = _plain_copy(model)
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    y = model(x)
    assert y.is_contiguous()  # NCHW out, as a plain Sequential gives it, whatever it ran in
    (d,) = [d for d in autotune.decisions() if d.family == "layout"]
    assert d.choice == winner and set(d.times_ms) == {"channels_last", "contiguous"} and d.cost_s > 0
    # one call's effect, not the measuring's: outputs, gradients and running statistics as the plain model's
    with fusedcnn.use_backend("torch"):
        x2 = x.detach().clone().requires_grad_()
        y2 = plain(x2)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for (name, p), p2 in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, b), b2 in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, b2, rtol=1e-5, atol=1e-6, msg=name)
    # the second conv run gets NHWC activations when channels_last won;
    # batch 6: the same bucket as 5 (8), nothing measured again
    from fusedcnn.ops import fused as F_fused
    n, seen, real = len(autotune.decisions()), [], F_fused.conv_bn_relu
    monkeypatch.setattr(F_fused, "conv_bn_relu", lambda x, *a, **k: seen.append(x.stride()) or real(x, *a, **k))
    model(torch.randn(6, 1, 8, 8, requires_grad=True))
    assert len(autotune.decisions()) == n
    assert len(seen) == 2 and (seen[1][1] == 1) == (winner == "channels_last"), seen


def test_the_memory_format_is_not_measured_off_auto_or_switched_off(monkeypatch):
    _conv_stack(backend="torch")(torch.randn(4, 1, 8, 8))
    with fusedcnn.use_backend("torch"):
        _conv_stack()(torch.randn(4, 1, 8, 8))
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    _conv_stack()(torch.randn(4, 1, 8, 8))
    assert autotune.decisions() == []


def test_the_layout_conversion_hands_the_gradient_back_in_the_source_format():
    from fusedcnn.nn.fused import _Relayout
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = _Relayout.apply(x, torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    (g,) = torch.autograd.grad(y, x, torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    assert g.is_contiguous()  # NCHW, as x: an NCHW layer before it gets no mixed-format gradient
    torch.testing.assert_close(y, x)
