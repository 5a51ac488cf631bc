"""Kernel choices by measurement (bayesify.backends): cached per process and thread-safe, off by a
flag, logged, and every candidate kernel gives the same outputs and gradients."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesify as bf
from bayesify import _batched, backends


@pytest.fixture(autouse=True)
def _autotune_on(monkeypatch):
    """Off by default (bayesify.backends); these tests are about the measured choice."""
    monkeypatch.setattr(backends, "autotune", True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _conv_model(c: int, o: int) -> nn.Module:
    # a 2x2 map into the 3x3 convolution: 4 output positions (a candidate for the GEMM)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, o, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * o, 3))


def _step(bnn: nn.Module, x: torch.Tensor, samples: int = 3):
    torch.manual_seed(0)  # the local estimator's output noise comes from the global generator
    if x.is_cuda:
        out = bnn(x, samples=samples)
    else:
        out = bnn(x, samples=samples, generator=_gen(0))
    grads = torch.autograd.grad(out.sum() + out.log_probs.sum(), [p for p in bnn.parameters() if p.requires_grad])
    return out, grads


def test_choice_is_measured_once_per_shape_and_cached(caplog):
    bnn = bf.bayesify(_conv_model(5, 7))  # channel counts no other test uses: a shape new to this process
    x = torch.randn(4, 5, 2, 2)
    before = backends.trial_count()
    with caplog.at_level(logging.DEBUG, logger="bayesify"):
        _step(bnn, x)
    first = backends.trial_count()
    assert first == before + 1  # one convolution, one measurement
    logged = [r.getMessage() for r in caplog.records if "measured" in r.getMessage()]
    assert len(logged) == 1 and "w(3, 7, 5, 3, 3)" in logged[0] and "S=3" in logged[0], logged
    key, (choice, times) = next((k, v) for k, v in backends.choices().items() if "w(3, 7, 5, 3, 3)" in k[2])
    assert choice in ("gemm", "conv", "loop") and set(times) == {"gemm", "conv", "loop"}
    assert f": {choice} (measured" in logged[0]
    assert times[choice] == min(times.values())
    for _ in range(2):  # the same shapes again: the cached choice, no trial
        _step(bnn, x)
    assert backends.trial_count() == first
    _step(bnn, x, samples=5)  # another sample count is another key
    assert backends.trial_count() == first + 1
    with torch.no_grad():  # no gradients needed: a forward-only trial, another key
        bnn(x, samples=5)
    assert backends.trial_count() == first + 2


def test_flag_off_uses_the_fixed_rule_without_trials(monkeypatch, caplog):
    monkeypatch.setattr(backends, "autotune", False)
    bnn = bf.bayesify(_conv_model(6, 9))
    before = backends.trial_count()
    with caplog.at_level(logging.DEBUG, logger="bayesify"):
        _step(bnn, torch.randn(2, 6, 2, 2))
    assert backends.trial_count() == before
    assert not any("w(3, 9, 6, 3, 3)" in k[2] for k in backends.choices())
    msgs = [r.getMessage() for r in caplog.records]
    assert any("w(3, 9, 6, 3, 3)" in m and ": gemm (fixed rule" in m for m in msgs), msgs
    # the 8x8 map is over the fixed rule's GEMM_MAX_POSITIONS: not even routed to the per-sample kernel
    assert not _batched.conv2d_by_gemm(torch.empty(2, 6, 8, 8), (9, 6, 3, 3), 1, 1, 1, 1)
    monkeypatch.setattr(backends, "autotune", True)
    assert _batched.conv2d_by_gemm(torch.empty(2, 6, 8, 8), (9, 6, 3, 3), 1, 1, 1, 1)


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("1", True), (None, False)])
def test_environment_variable_sets_the_flag(value, expected):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("BAYESIFY_AUTOTUNE", None)
    if value is not None:
        env["BAYESIFY_AUTOTUNE"] = value
    out = subprocess.run([sys.executable, "-c", "import bayesify as bf; print(bf.backends.autotune)"],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == str(expected)


def test_cache_is_thread_safe():
    # threads meeting a new shape at once: one measurement, one choice for all, no error
    models = [bf.bayesify(_conv_model(7, 5)) for _ in range(4)]  # own model per thread, the same shapes
    x = torch.randn(3, 7, 2, 2)
    before = backends.trial_count()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    results: list[torch.Tensor] = []

    def work(model: nn.Module) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                results.append(model(x, samples=2, generator=_gen(1)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert backends.trial_count() == before + 1
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])


def test_no_trial_under_autocast():
    bnn = bf.bayesify(_conv_model(3, 11))
    before = backends.trial_count()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bnn(torch.randn(2, 3, 2, 2), samples=2)
    (out.float().sum() + out.log_probs.sum()).backward()
    assert backends.trial_count() == before


# (in, out, H, W, kernel, stride, padding, dilation): 1, 4, 4, 16 and 64 output positions
GEOMETRIES = [(4, 5, 1, 1, 3, 1, 1, 1), (4, 5, 2, 2, 3, 1, 1, 1), (3, 2, 4, 4, (1, 2), 2, (0, 1), 1),
              (4, 6, 4, 4, 3, 1, 1, 1), (3, 4, 8, 8, 3, 1, 2, 2)]
LAYOUTS = [  # (x, weight, bias): "S" per sample, "1" shared by the samples, None absent
    ("S", "S", "S"), ("S", "S", "1"), ("S", "S", None), ("1", "S", "S"), ("1", "S", None), ("S", "1", None),
    ("S", "1", "1")]


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_every_candidate_kernel_gives_the_default_outputs_and_gradients(geometry, layout, unbatched):
    c, o, h, w_, k, stride, padding, dilation = geometry
    geo = tuple(_batched._pair(v) for v in (stride, padding, dilation))
    kh, kw = _batched._pair(k)
    s, n = 3, 2
    g = _gen(2)
    one = (c, h, w_) if unbatched else (n, c, h, w_)
    lx, lw, lb = layout
    x = torch.randn((s, *one) if lx == "S" else one, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn((s, o, c, kh, kw) if lw == "S" else (o, c, kh, kw), generator=g, dtype=torch.float64,
                    requires_grad=True)
    b = None if lb is None else torch.randn((s, o) if lb == "S" else (o,), generator=g, dtype=torch.float64,
                                            requires_grad=True)
    inputs = [t for t in (x, w, b) if t is not None]
    dims = tuple(None if t is None or lay != "S" else 0 for t, lay in zip((x, w, b), layout))
    want = torch.vmap(lambda a, ww, bb: F.conv2d(a, ww, bb, *geo), in_dims=dims)(x, w, b)  # PyTorch's rule
    got = _batched._conv2d_gemm_over_samples(x, w, b, lw == "1", unbatched, geo)
    torch.testing.assert_close(got, want)
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, inputs, up)
    for a, e in zip(torch.autograd.grad(got, inputs, up), want_grads):
        torch.testing.assert_close(a, e)
    if lw == "S":  # the loop kernel (per-sample weights only): one plain F.conv2d per sample
        looped = _batched._conv2d_loop_over_samples(x, w, b, lx == "1", lb == "1", geo)
        torch.testing.assert_close(looped, want)
        for a, e in zip(torch.autograd.grad(looped, inputs, up), want_grads):
            torch.testing.assert_close(a, e)
    # and through SampleConv2d's vmap rule, whichever kernel is chosen for these shapes
    via_rule = torch.vmap(lambda a, ww, bb: _batched.SampleConv2d.apply(a, ww, bb, *geo), in_dims=dims)(x, w, b)
    torch.testing.assert_close(via_rule, want)


@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
def test_model_step_is_the_same_with_either_kernel(monkeypatch, estimator):
    # the fixed rule forced each way (every small-map convolution a GEMM / none), and the tuned choice.
    # (Not "local": its output noise, randn_like of the layer's output, follows the output's
    # memory layout, which differs between the kernels: the same distribution, other draws.)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 6, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(24, 2))
    bnn = bf.bayesify(model, estimator=estimator)
    x = torch.randn(4, 3, 4, 4)
    out, grads = _step(bnn, x)
    monkeypatch.setattr(backends, "autotune", False)
    for positions in (0, 64):
        monkeypatch.setattr(_batched, "GEMM_MAX_POSITIONS", positions)
        ref, ref_grads = _step(bnn, x)
        torch.testing.assert_close(out, ref)
        for a, e in zip(grads, ref_grads):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_step_is_the_same_with_each_kernel_forced_through_the_vmap_rule(monkeypatch, channels_last):
    # every small-map convolution through SampleConv2d's vmap rule with the kernel forced: "loop"
    # (one plain F.conv2d per sample), "gemm", "conv" (PyTorch's rule); strided, dilated, padded
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(24, 2))
    bnn = bf.bayesify(model)
    x = torch.randn(4, 3, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results, asked = {}, []
    for kernel in ("conv", "gemm", "loop"):
        monkeypatch.setattr(_batched, "conv2d_kernel", lambda *args, kernel=kernel: asked.append(kernel) or kernel)
        results[kernel] = _step(bnn, x)
    assert asked.count("loop") == 2  # both convolutions went through the rule
    out, grads = results["conv"]
    for kernel in ("gemm", "loop"):
        torch.testing.assert_close(results[kernel][0], out)
        for a, e in zip(results[kernel][1], grads):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_candidates_agree_and_the_choice_is_measured_there(dtype):
    bnn = bf.bayesify(_conv_model(5, 13)).to(device="cuda", dtype=dtype)
    x = torch.randn(4, 5, 2, 2, device="cuda", dtype=dtype)
    before = backends.trial_count()
    out, grads = _step(bnn, x)
    assert backends.trial_count() == before + 1
    assert any("cuda" in k[9] and "w(3, 13, 5, 3, 3)" in k[2] for k in backends.choices())
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    try:
        backends.autotune = False
        for positions in (0, 64):
            _batched.GEMM_MAX_POSITIONS = positions
            ref, ref_grads = _step(bnn, x)
            torch.testing.assert_close(out, ref, **tol)
            for a, e in zip(grads, ref_grads):
                torch.testing.assert_close(a, e, **tol)
    finally:
        backends.autotune, _batched.GEMM_MAX_POSITIONS = True, 4


def test_choose_times_each_candidate_run_and_keeps_the_fastest():
    # real callables: each made once, run once to warm up and REPEATS times timed; the one
    # that sleeps 30 ms per run loses to the one that does not, whatever the machine's load
    made: list[str] = []
    runs: list[str] = []

    def candidate(name: str, seconds: float):
        def make():
            made.append(name)

            def run() -> None:
                runs.append(name)
                if seconds:
                    threading.Event().wait(seconds)

            return run

        return make

    key = ("test", "choose", os.getpid(), id(made))
    choice = backends.choose(key, {"slow": candidate("slow", 0.03), "fast": candidate("fast", 0.0)}, "slow",
                             torch.device("cpu"))
    assert choice == "fast"
    assert sorted(made) == ["fast", "slow"]
    assert runs.count("slow") == runs.count("fast") == backends.REPEATS + 1
    times = backends.choices()[key][1]
    assert times["slow"] >= 0.03 > times["fast"]
    # a second call: the cached choice, nothing made or run
    assert backends.choose(key, {"slow": candidate("slow", 0.03)}, "slow", torch.device("cpu")) == "fast"
    assert len(made) == 2 and len(runs) == 2 * (backends.REPEATS + 1)


def test_a_candidate_that_fails_its_trial_is_out():
    def broken():
        def run() -> None:
            raise RuntimeError("no kernel for this")

        return run

    def works():
        return lambda: None

    key = ("test", "broken", os.getpid())
    assert backends.choose(key, {"broken": broken, "works": works}, "broken", torch.device("cpu")) == "works"
    assert backends.choices()[key][1]["broken"] == float("inf")


# (H, W, kernel, stride, padding, dilation, trimmed kernel): maps small enough that some taps only meet padding
TRIMS = [(1, 1, 3, 1, 1, 1, (1, 1)), (2, 2, 3, 2, 1, 1, (2, 2)), (1, 1, 3, 1, 2, 2, (1, 1)), (2, 2, 3, 1, 1, 1, (3, 3)),
         (1, 3, (3, 3), 1, 1, 1, (1, 3)), (1, 1, 5, 1, 2, 1, (1, 1)), (2, 3, 5, 2, (2, 1), 1, (2, 3)),
         (4, 4, 3, 2, 1, 1, (3, 3)), (2, 2, 3, 1, 2, 2, (1, 1))]


@pytest.mark.parametrize("by_function", [True, False], ids=["kept-taps-function", "strided-view"])
@pytest.mark.parametrize("trim", TRIMS)
def test_trimming_the_padding_taps_keeps_outputs_and_gradients(monkeypatch, trim, by_function):
    monkeypatch.setattr(_batched, "TRIM_BY_FUNCTION", by_function)
    h, w_, k, stride, padding, dilation, kept = trim
    geo = tuple(_batched._pair(v) for v in (stride, padding, dilation))
    g = _gen(3)
    kh, kw = _batched._pair(k)
    x = torch.randn(2, 4, h, w_, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, kh, kw, generator=g, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(_batched, "TRIM_MAX_KEPT_INVERSE", 1)  # trim whatever can be trimmed
    tw, tgeo = _batched.trim_padding_taps((h, w_), w, geo)
    assert tuple(tw.shape[-2:]) == kept
    want = torch.vmap(lambda q: F.conv2d(x, q, None, *geo))(w)
    got = torch.vmap(lambda q: F.conv2d(x, q, None, *tgeo))(tw)
    torch.testing.assert_close(got, want)
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, [x, w], up)
    for a, e in zip(torch.autograd.grad(got, [x, w], up), want_grads):
        torch.testing.assert_close(a, e)
    # and the whole rule (trim + the chosen kernel) against PyTorch's, with each kernel forced
    for kernel in ("conv", "gemm", "loop"):
        old, _batched.conv2d_kernel = _batched.conv2d_kernel, lambda *args: kernel
        try:
            via = torch.vmap(lambda q: _batched.SampleConv2d.apply(x, q, None, *geo))(w)
        finally:
            _batched.conv2d_kernel = old
        torch.testing.assert_close(via, want)
        for a, e in zip(torch.autograd.grad(via, [x, w], up), want_grads):
            torch.testing.assert_close(a, e)


def test_trimming_keeps_the_full_kernel_where_most_taps_remain():
    w = torch.randn(2, 4, 3, 3, 3)
    geo = ((2, 2), (1, 1), (1, 1))
    assert _batched.trim_padding_taps((2, 2), w, geo)[0] is w  # 2x2 of 3x3 taps: not worth the copy
    tw, tgeo = _batched.trim_padding_taps((1, 1), w, ((1, 1), (1, 1), (1, 1)))  # the centre tap alone
    assert tw.shape[-2:] == (1, 1) and tgeo[1] == (0, 0)


@pytest.mark.parametrize("trim", TRIMS)
def test_the_kept_taps_function_equals_the_strided_view(monkeypatch, trim):
    """``_KeptTaps`` (a contiguous copy; backward pads the gradient) against the strided view it
    replaced (autograd's slice backwards): the same kept taps and gradient bit for bit (also a double
    backward through the trim), and the same outputs and every gradient (float64, up to summation
    order) through the whole rule with each kernel forced."""
    h, w_, k, stride, padding, dilation, _ = trim
    geo = tuple(_batched._pair(v) for v in (stride, padding, dilation))
    g = _gen(4)
    kh, kw = _batched._pair(k)
    x = torch.randn(2, 4, h, w_, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, kh, kw, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(_batched, "TRIM_MAX_KEPT_INVERSE", 1)
    results, chooser = [], _batched.conv2d_kernel
    for by_function in (False, True):
        monkeypatch.setattr(_batched, "TRIM_BY_FUNCTION", by_function)
        tw, _ = _batched.trim_padding_taps((h, w_), w, geo)
        assert tw.is_contiguous() == by_function or tw.shape == w.shape
        (gw,) = torch.autograd.grad(tw, w, torch.ones_like(tw), create_graph=True)
        (ggw,) = torch.autograd.grad((gw * gw).sum() + (tw * tw).sum(), w)
        per_kernel = []
        for kernel in ("conv", "gemm", "loop"):
            monkeypatch.setattr(_batched, "conv2d_kernel", lambda *args, kernel=kernel: kernel)
            out = torch.vmap(lambda q, r: _batched.SampleConv2d.apply(x, q, r, *geo))(w, b)
            up = torch.randn(out.shape, generator=_gen(5), dtype=torch.float64)
            per_kernel.append((out, *torch.autograd.grad(out, [x, w, b], up)))
        monkeypatch.setattr(_batched, "conv2d_kernel", chooser)
        results.append((tw, gw, ggw, per_kernel))
    (tw0, gw0, ggw0, k0), (tw1, gw1, ggw1, k1) = results
    assert torch.equal(tw0, tw1) and torch.equal(gw0, gw1) and torch.equal(ggw0, ggw1)
    for a, e in zip(k1, k0):  # the kernels read a contiguous kernel now: the same up to summation order
        for t1, t0 in zip(a, e):
            torch.testing.assert_close(t1, t0, rtol=1e-12, atol=1e-12)


# (C, H, W, kernel, stride, padding, dilation): the GEMM's geometries, with and without padding, strided,
# dilated, asymmetric; maps where some taps meet only padding and where a tap meets none
ROWS_GEOMETRIES = [(4, 2, 2, 3, 1, 1, 1), (4, 2, 2, 3, 2, 1, 1), (3, 4, 4, 3, 2, 1, 1), (3, 4, 4, 1, 2, 0, 1),
                   (2, 1, 1, 1, 1, 0, 1), (3, 3, 5, (3, 2), (1, 2), (2, 0), (2, 1)), (2, 5, 4, 3, 1, 0, 1),
                   (2, 2, 3, 5, 1, 2, 1), (2, 1, 1, 3, 1, 1, 1)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shared_x", [False, True])
@pytest.mark.parametrize("geometry", ROWS_GEOMETRIES)
def test_rows_gemm_equals_the_columns_gemm(geometry, shared_x, channels_last):
    """The GEMM over rows unfolded per tap (``_BatchedConv2dGemmRows``, ``_rows`` / ``_fold_rows``)
    against the previous GEMM over ``F.unfold``'s columns and against ``F.conv2d`` per sample:
    outputs and every gradient (float64), per-sample or shared input, contiguous or channels_last."""
    c, h, w_, k, stride, padding, dilation = geometry
    geo = tuple(_batched._pair(v) for v in (stride, padding, dilation))
    kh, kw = _batched._pair(k)
    g = _gen(6)
    s, n, o = 3, 2, 5
    x = torch.randn(*(() if shared_x else (s,)), n, c, h, w_, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.flatten(0, -4).contiguous(memory_format=torch.channels_last).view(x.shape)
    x.requires_grad_()
    w = torch.randn(s, o, c, kh, kw, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(s, o, generator=g, dtype=torch.float64, requires_grad=True)
    rows, (ho, wo) = _batched._rows(x, w.shape, *geo)
    cols, _ = _batched._columns(x, w.shape, *geo)
    assert torch.equal(rows, cols.transpose(-1, -2))
    got = _batched._BatchedConv2dGemmRows.apply(x, w, b, *geo)
    want = _batched._BatchedConv2dGemm.apply(x, w, b, *geo)
    ref = torch.stack([F.conv2d(x if shared_x else x[i], w[i], b[i], *geo) for i in range(s)])
    assert got.shape == want.shape == ref.shape == (s, n, o, ho, wo) and got.is_contiguous()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, ref)
    up = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, e, r in zip(torch.autograd.grad(got, [x, w, b], up), torch.autograd.grad(want, [x, w, b], up),
                       torch.autograd.grad(ref, [x, w, b], up)):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(a, r)


def test_rows_gemm_output_may_be_modified_in_place():
    """A 1x1 output map (the permuted product is contiguous already) still comes back as a fresh
    tensor: an in-place ReLU after the convolution, as models write it, and its gradient."""
    g = _gen(7)
    x = torch.randn(3, 2, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    geo = ((1, 1), (1, 1), (1, 1))
    out = _batched._BatchedConv2dGemmRows.apply(x, w, None, *geo)
    assert out._base is None
    out.relu_().sum().backward()
    ref = torch.stack([F.conv2d(x[i], w[i], None, *geo) for i in range(3)]).relu()
    torch.testing.assert_close(out, ref)
    assert x.grad is not None and w.grad is not None
