"""The vmapped call's rules: partial conversions stay vectorised (the frozen prefix runs once),
a vmap failure is decided per cause, the rules are scoped to the sampling thread, and a user's
error reads as the point model's."""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import bayesify as bf

from .models import CASES

_is_batched = torch._C._functorch.is_batchedtensor
_CASE = {c.name: c for c in CASES}


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _watch(module: nn.Module) -> list[bool]:
    """Per call of ``module``: whether its output is batched over the samples (computed per sample)."""
    seen: list[bool] = []
    module.register_forward_hook(lambda m, i, o: seen.append(_is_batched(_hidden(o))))
    return seen


def _flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


# (case, include= its last block, the first block, the last block)
PARTIAL = [
    ("minilm_pretrained", ["encoder.layer.5.*", "pooler.*"], "encoder.layer.0", "encoder.layer.5"),
    ("gpt2", ["transformer.h.1.*"], "transformer.h.0", "transformer.h.1"),
    ("t5", ["decoder.block.1.*"], "encoder.block.0", "decoder.block.1"),
    ("distilbert", ["distilbert.transformer.layer.1.*"], "distilbert.transformer.layer.0",
     "distilbert.transformer.layer.1"),
    ("hf_vit", ["vit.layers.1.*"], "vit.layers.0", "vit.layers.1"),
]


@pytest.mark.parametrize("name, include, first, last", PARTIAL, ids=[p[0] for p in PARTIAL])
def test_partial_conversion_runs_the_frozen_prefix_once(name, include, first, last):
    # Attention whose inputs depend on no sampled weight used to raise inside the vmapped call
    # ("folded attention runs only inside torch.vmap"), and every sample ran in the loop.
    case = _CASE[name]
    torch.manual_seed(0)
    model = case.build().eval()
    args, kw = case.inputs()
    part = bf.bayesify(model, include=include).eval()
    full = bf.bayesify(model).eval()
    frozen, sampled = _watch(part.model.get_submodule(first)), _watch(part.model.get_submodule(last))
    S = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no loop fallback, no PyTorch per-sample attention
        part_flops = _flops(lambda: part(*args, samples=S, **kw))
        full_flops = _flops(lambda: full(*args, samples=S, **kw))
    assert part._vmap_failure is None
    assert frozen == [False]  # one call (the loop makes S), on tensors shared by the samples
    assert sampled == [True]
    point_flops = _flops(lambda: model(*args, **kw))
    assert full_flops >= S * point_flops * 0.99
    # MiniLM: 5 of 6 blocks once, 1 block S times: (5 + S) / (6 S) = 0.375 of the full model's
    assert part_flops < full_flops * (0.4 if name == "minilm_pretrained" else 0.9)


def test_partial_minilm_matches_the_loop():
    # The frozen prefix computed once gives what each sample computes on its own (and the call is
    # vectorised; a remembered limit, data-dependent control flow, is pinned in test_sampling.py).
    torch.manual_seed(0)
    part = bf.bayesify(_CASE["minilm_pretrained"].build(), include=["encoder.layer.5.*", "pooler.*"]).eval()
    ids = torch.randint(1000, 2000, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = part(input_ids=ids, samples=3, generator=torch.Generator().manual_seed(1)).pooler_output
        w, *_ = part._draw(3, torch.Generator().manual_seed(1), False)
        for s in range(3):
            sample = {k.removeprefix("model."): v[s] for k, v in w.items()}
            ref = torch.func.functional_call(part.model, sample, (),
                                             {"input_ids": ids}).pooler_output
            torch.testing.assert_close(out[s], ref)


# --------------------------------------------------------------------------------------
# a vmap failure is decided per cause
# --------------------------------------------------------------------------------------


class ComplexSignal(nn.Module):
    """A model for complex inputs: a real tensor is the caller's mistake."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.imag)  # "imag is not implemented for tensors with non-complex dtypes."


def test_a_user_error_is_the_point_models_and_is_not_remembered():
    # Its text holds "is not implemented for": it was taken for vmap's limit, and every later
    # (correct) call then ran the samples one by one.
    torch.manual_seed(0)
    model = ComplexSignal()
    bnn = bf.bayesify(model)
    real = torch.randn(5, 4)
    with pytest.raises(RuntimeError) as point:
        model(real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as got:
            bnn(real, samples=3)
        assert str(got.value) == str(point.value)
        assert bnn._vmap_failure is None
        out = bnn(torch.randn(5, 4, dtype=torch.complex64), samples=3)  # vectorised: no warning
    assert out.shape == (3, 5, 3)


class Accumulate(nn.Module):
    """Sums into a tensor made inside the forward: vmap cannot write the samples into it in place
    (and its error does not say vmap), one sample at a time can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        total = torch.zeros(3)
        total.add_(self.fc(x).sum(0))
        return total


def test_a_failure_vmap_does_not_name_runs_the_loop_without_being_remembered():
    torch.manual_seed(0)
    model = Accumulate()
    bnn = bf.bayesify(model)
    x = torch.randn(5, 4)
    calls = [0]
    bnn.model.fc.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    for _ in range(2):
        calls[0] = 0
        with pytest.warns(RuntimeWarning, match="one by one"):
            out = bnn(x, samples=3, generator=torch.Generator().manual_seed(0))
        assert calls[0] == 1 + 3  # vmap tried again, then the loop
        assert bnn._vmap_failure is None
    w, *_ = bnn._draw(3, torch.Generator().manual_seed(0), False)
    ref = torch.stack([F.linear(x, w["model.fc.weight"][s], w["model.fc.bias"][s]).sum(0) for s in range(3)])
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------
# a wrong input width reads as the point model's error
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5), (5,)])
def test_wrong_input_width_reads_like_the_point_model(shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 7))
    bnn = bf.bayesify(model)
    x = torch.randn(shape)
    with pytest.raises(RuntimeError) as point:
        model(x)
    calls = [0]
    bnn.model[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as got:
            bnn(x, samples=4)
    assert str(got.value) == str(point.value)
    assert str(got.value).startswith("mat1 and mat2 shapes cannot be multiplied")
    assert calls[0] == 1  # raised in the vmapped call: no sample-by-sample retry
    assert bnn._vmap_failure is None


# --------------------------------------------------------------------------------------
# the rules are scoped to the sampling thread
# --------------------------------------------------------------------------------------


def _tiny_bert() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    return transformers.BertModel(config).eval()


def _pause(module: nn.Module, arrived: threading.Event, resume: threading.Event) -> None:
    """Stop ``module``'s first call until ``resume`` is set (signalling ``arrived``)."""
    def hook(*_: Any) -> None:
        if not arrived.is_set():
            arrived.set()
            assert resume.wait(60), "the other thread never resumed this one"
    module.register_forward_pre_hook(hook)


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["out"] = fn()
        except BaseException as exc:  # reported by the test
            result["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_another_thread_gets_pytorchs_attention_meanwhile():
    bnn = bf.bayesify(_tiny_bert()).eval()
    ids = torch.randint(1, 100, (2, 8))
    arrived, resume = threading.Event(), threading.Event()
    _pause(bnn.model.encoder.layer[1], arrived, resume)  # after one attention, before the next
    thread, result = _in_thread(lambda: bnn(input_ids=ids, samples=3))
    try:
        assert arrived.wait(60)
        # the sampling thread is inside its vmapped forward now
        assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
        assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
        assert not torch._C._is_torch_function_mode_enabled()
        q = torch.randn(2, 2, 8, 16)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q),
                                   torch.softmax(q @ q.transpose(-1, -2) / 4, -1) @ q)
    finally:
        resume.set()
        thread.join(60)
    assert "error" not in result, result.get("error")
    assert result["out"].last_hidden_state.shape == (3, 2, 8, 32)


def test_two_sampling_threads_both_fold_their_attention():
    # Before: the first thread replaced F.scaled_dot_product_attention and put it back when its
    # call ended, in the middle of the second thread's call, whose attention then ran sample by
    # sample through PyTorch's fallback ("performance drop" warning).
    first, second = bf.bayesify(_tiny_bert()).eval(), bf.bayesify(_tiny_bert()).eval()
    ids = torch.randint(1, 100, (2, 8))
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    _pause(first.model.encoder.layer[0], a_in, b_in)
    _pause(second.model.encoder.layer[0], b_in, a_done)

    def run_first() -> Any:
        try:
            return first(input_ids=ids, samples=3)
        finally:
            a_done.set()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ta, ra = _in_thread(run_first)
        assert a_in.wait(60)
        tb, rb = _in_thread(lambda: second(input_ids=ids, samples=3))
        ta.join(60)
        tb.join(60)
    assert "error" not in ra and "error" not in rb, (ra.get("error"), rb.get("error"))
    assert [str(w.message) for w in caught] == []
    assert first._vmap_failure is None and second._vmap_failure is None
    with torch.no_grad():
        torch.testing.assert_close(rb["out"].last_hidden_state.mean(0), second.model(input_ids=ids).last_hidden_state,
                                   atol=0.5, rtol=0)


def test_threads_sampling_one_model_take_turns():
    # The samples are substituted into the model's parameter slots for the forward: threads
    # sampling the same model at once read each other's samples (or BatchedTensors of another
    # thread's vmap: "your tensor may have escaped from inside a function being vmapped").
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)])).eval()
    x = torch.randn(8, 32)

    def run(seed: int) -> Tensor:
        with torch.no_grad():
            return bnn(x, samples=4, generator=torch.Generator().manual_seed(seed))

    ref = {s: run(s) for s in range(3)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [_in_thread(lambda s=s: [torch.equal(run(s), ref[s]) for _ in range(10)]) for s in range(3)]
        for thread, _ in threads:
            thread.join(120)
    for _, result in threads:
        assert "error" not in result, result.get("error")
        assert all(result["out"])
    assert [str(w.message) for w in caught] == [] and bnn._vmap_failure is None


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.bn1d = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(self.bn1d(h))


@pytest.mark.parametrize("with_grad", [False, True])
def test_eval_batchnorm_folds_the_samples_and_matches_pytorchs_rule(with_grad: bool, monkeypatch) -> None:
    """Eval-mode BatchNorm with shared statistics: the samples fold into the batch (one call, the
    point model's), the same outputs and gradients as PyTorch's own batching rule."""
    from bayesify import _batched, _vmap_rules

    torch.manual_seed(0)
    point = _ConvBN().double()
    for bn in (point.bn, point.bn1d):  # non-trivial statistics and affine
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    bnn = bf.bayesify(point, variational=bf.variational.MeanFieldNormal(init_std=0.1)).eval()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    folded: list[int] = []
    rule = _batched.SampleBatchNorm.vmap

    def counted(*args: Any) -> Any:
        folded.append(1)
        return rule(*args)

    def run() -> tuple[Tensor, list[Tensor]]:
        bnn.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(with_grad):
            out = bnn(x, samples=4, generator=torch.Generator().manual_seed(1))
        if not with_grad:
            return out, []
        out.square().sum().backward()
        return out, [p.grad for p in bnn.parameters() if p.grad is not None]

    monkeypatch.setattr(_batched.SampleBatchNorm, "vmap", staticmethod(counted))
    out, grads = run()
    assert len(folded) == 2
    monkeypatch.setattr(_vmap_rules, "_batch_norm", F.batch_norm)  # PyTorch's batching rule
    ref, ref_grads = run()
    assert len(folded) == 2
    torch.testing.assert_close(out, ref)
    assert len(grads) == len(ref_grads) and (not with_grad or grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


class _TrainBNs(nn.Module):
    """Training-mode BatchNorms of every kind the fold meets: 2-d after a convolution (affine, no
    affine, no running statistics), 1-d on ``(N, C)`` and ``(N, C, L)``, an in-place ReLU after."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.bn_plain = nn.BatchNorm2d(6, affine=False, momentum=0.3)
        self.bn_untracked = nn.BatchNorm2d(6, track_running_stats=False)
        self.small = nn.Conv2d(6, 6, 3, stride=3, padding=1)  # 2x2 output: the GEMM kernel, samples first
        self.bn_small = nn.BatchNorm2d(6)
        self.bn1d_seq = nn.BatchNorm1d(6)
        self.bn1d = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x)), inplace=True)
        h = self.bn_untracked(self.bn_plain(h)).relu_()
        h = h + F.interpolate(self.bn_small(self.small(h)), size=h.shape[-2:])
        h = self.bn1d_seq(h.flatten(2)).mean(2)
        return self.fc(self.bn1d(h))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_batchnorm_folds_the_samples_and_matches_pytorchs_rule(dtype: torch.dtype, monkeypatch) -> None:
    """Training-mode BatchNorm (per-sample batch statistics and running statistics): one folded call
    per layer, the same outputs, every gradient and the same updated running statistics as
    PyTorch's batching rule."""
    from bayesify import _batched, _vmap_rules

    torch.manual_seed(0)
    point = _TrainBNs().to(dtype)
    for bn in (point.bn, point.bn1d, point.bn1d_seq, point.bn_small):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(5, 3, 6, 6, dtype=dtype)
    folded: list[int] = []
    rule = _batched.SampleBatchNormTrain.vmap

    def counted(*args: Any) -> Any:
        folded.append(1)
        return rule(*args)

    monkeypatch.setattr(_batched.SampleBatchNormTrain, "vmap", staticmethod(counted))

    def run(fold: bool) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        monkeypatch.setattr(_vmap_rules, "TRAIN_BATCHNORM_FOLD", fold)
        bnn = bf.bayesify(copy.deepcopy(point), variational=bf.variational.MeanFieldNormal(init_std=0.1)).train()
        out = bnn(x, samples=4, generator=torch.Generator().manual_seed(1))
        assert bnn._vmap_failure is None  # vmapped, not the per-sample loop
        out.square().sum().backward()
        return out, [p.grad for p in bnn.parameters()], {k: v.clone() for k, v in bnn.state_dict().items()}

    out, grads, state = run(True)
    assert len(folded) == 6
    ref, ref_grads, ref_state = run(False)
    assert len(folded) == 6
    # float32: a conv bias before a BatchNorm has a zero gradient in exact arithmetic, ~1e-4 in rounding
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-3}
    torch.testing.assert_close(out, ref, **tol)
    assert all(g is not None for g in grads) and len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)
    assert state.keys() == ref_state.keys()
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], **tol)
