"""Variational layers: drop-in Bayesian versions of ``torch.nn`` layers.

Each ``VIxxx`` *is* its ``torch.nn`` namesake (a subclass), so it accepts every
argument of it (padding modes, groups, dilation, ``output_padding``,
``padding_idx``, ``bias=False``, ``elementwise_affine=False``, ...) plus
``prior=``, ``variational=`` and ``estimator=``, and computes with the same
``torch.nn.functional`` call. Its ``weight`` / ``bias`` hold the posterior
means; the sampler substitutes weight samples for them (see ``bayesify.sites``).

``estimator=`` picks how a layer's weights are sampled: ``"reparam"`` (default;
per-sample weights drawn by the sampler, exact ``log_probs``), ``"local"`` (local
reparameterisation: Gaussian outputs from the means and variances, no weight
sample) or ``"flipout"`` (one shared weight perturbation per sample, decorrelated
across examples by random signs). ``local`` / ``flipout`` need a family with an
elementwise ``std`` and use the closed-form KL. ``VIEmbedding`` implements both as
a gather of the looked-up rows (never a ``(samples, vocab, dim)`` tensor);
``VILayerNorm`` implements both as local reparameterisation of its elementwise
affine map. Tied parameters must share one estimator.

Example::

    >>> import bayesify as bf
    >>> layer = bf.nn.VILinear(3, 2, prior="normal", variational="meanfield")
    >>> layer(torch.randn(4, 3), samples=5).shape
    torch.Size([5, 4, 2])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._batched import SampleConv2d, SampleLinear, conv2d_by_gemm, kernels_apply
from .module import VIModule, sampling_active
from .priors import Normal, Prior, get_prior
from .sites import make_bayesian, remove_bayesian, validate_estimator
from .variational import MeanFieldNormal, VariationalFamily, get_variational

__all__ = [
    "VILayer", "VILinear", "VIConv1d", "VIConv2d", "VIConv3d", "VIConvTranspose1d", "VIConvTranspose2d",
    "VIConvTranspose3d", "VILayerNorm", "VIEmbedding", "DEFAULT_MAPPING",
]


def _rebuild_as(module: nn.Module, cls: type) -> Any:
    """A new ``cls`` instance carrying ``module``'s attributes and tensors (no tensor copies,
    nothing lost). Containers (parameter / buffer / module / hook dicts, sets) are copied
    shallowly so that registering on one object never affects the other."""
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        new.__dict__[key] = type(value)(value) if isinstance(value, (dict, set)) else value
    return new


class VILayer(VIModule):
    """Mixin for the variational layers: ``point_type`` and conversion in both directions."""

    point_type: type[nn.Module] = nn.Module
    estimator: str = "reparam"
    _vi_layer = True

    def _make_sites(self, prior: Any, variational: Any, estimator: str,
                    shared: dict | None = None) -> None:
        self.estimator = validate_estimator(estimator)
        p: Prior = get_prior(prior)
        q: VariationalFamily = get_variational(variational)
        for name in ("weight", "bias"):
            if isinstance(self._parameters.get(name), nn.Parameter):
                make_bayesian(self, name, p, q, shared)

    @classmethod
    def from_point(cls, point: nn.Module, prior: Any = None, variational: Any = None,
                   estimator: str = "reparam", shared: dict | None = None) -> "VILayer":
        """Bayesian copy of ``point`` whose means *are* its parameters (no tensor is copied)."""
        if type(point) is not cls.point_type:
            raise TypeError(f"{cls.__name__}.from_point expects a {cls.point_type.__name__}, "
                            f"got {type(point).__name__}")
        new = _rebuild_as(point, cls)
        new._make_sites(prior, variational, estimator, shared)
        return new

    def to_point(self) -> nn.Module:
        """The point layer with the posterior means as weights."""
        point = _rebuild_as(self, self.point_type)
        for name in list(getattr(self, "_vi_sites", {})):
            remove_bayesian(point, name)
        point.__dict__.pop("estimator", None)
        return point


    # -- in-layer estimators ("local", "flipout") -------------------------------------------
    # The sampler draws no weights for this layer's sites when ``estimator != "reparam"``
    # (it adds their closed-form KL instead); the forward then samples its *outputs*
    # itself while ``sampling_active()``. It runs under ``vmap(randomness="different")``,
    # so ``torch.randn_like`` gives independent noise per weight sample.

    def _samples_in_layer(self, name: str, tied: bool) -> bool:
        """Whether this layer draws site ``name`` inside its forward (see ``Site.sampled_in_layer``)."""
        return self.estimator != "reparam"

    def _own_noise(self) -> bool:
        """True when this forward must inject its own noise (a non-reparam estimator while sampling)."""
        return self.estimator != "reparam" and sampling_active()

    def _site_std(self, name: str) -> Tensor | None:
        """Elementwise posterior std of site ``name``, or None where it is absent or deterministic."""
        spec = getattr(self, "_vi_sites", {}).get(name)
        if spec is None or spec.variational.deterministic:
            return None
        mean = self._parameters[name]
        return spec.variational.std(mean, {k: getattr(self, f"{name}_{k}") for k in spec.vkeys})

    def _bias_sample(self) -> Tensor | None:
        """One bias draw per weight sample (shared across the batch), or the mean bias."""
        bias = self._parameters.get("bias")
        std = self._site_std("bias") if bias is not None else None
        return bias if std is None else bias + std * torch.randn_like(std)

    def _estimated(self, x: Tensor, apply: Any, sign_dims: int) -> Tensor:
        """Output of a layer linear in its weight, ``apply(x, weight, bias)``, under the estimator.

        ``local`` (Kingma et al. 2015): the output is Gaussian given ``x``, with mean
        ``apply(x, mu_w, mu_b)`` and variance ``apply(x**2, std_w**2, std_b**2)``; one
        independent normal draw per output element.
        ``flipout`` (Wen et al. 2018): one weight perturbation ``std_w * eps`` per sample,
        decorrelated across examples by random sign vectors on the input and output
        features: ``apply(x, mu_w, b) + apply(x * s_in, std_w * eps) * s_out``.
        ``sign_dims`` is the number of trailing dims that share one sign (the spatial dims
        of a convolution, 0 for a linear layer).
        """
        weight = self._parameters["weight"]
        w_std = self._site_std("weight")
        if self.estimator == "local":
            bias = self._parameters.get("bias")
            b_std = self._site_std("bias") if bias is not None else None
            mu = apply(x, weight, bias)
            if w_std is None and b_std is None:
                return mu
            if w_std is None:
                var = (b_std * b_std).reshape(-1, *([1] * sign_dims)).expand_as(mu)
            else:
                var = apply(x * x, w_std * w_std, None if b_std is None else b_std * b_std)
            return mu + _safe_sqrt(var) * torch.randn_like(mu)
        # flipout
        mu = apply(x, weight, self._bias_sample())
        if w_std is None:
            return mu
        s_in = _signs(x, sign_dims)
        delta = w_std * torch.randn_like(w_std)
        out = apply(x * s_in, delta, None)
        return mu + out * _signs(out, sign_dims)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        sites = getattr(self, "_vi_sites", {})
        if not sites:
            return base
        spec = next(iter(sites.values()))
        prior = f"prior={spec.prior!r}, " if spec.variational.weight_prior else ""
        return f"{base}, {prior}variational={spec.variational!r}"


def _safe_sqrt(var: Tensor) -> Tensor:
    # The floor keeps the gradient finite where the variance is exactly 0 (e.g. a zero input).
    return var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()


def _signs(like: Tensor, shared_trailing: int) -> Tensor:
    """Random +-1 per example and feature, shared over the last ``shared_trailing`` dims."""
    shape = like.shape[: like.dim() - shared_trailing] + (1,) * shared_trailing
    return torch.randn(shape, dtype=like.dtype, device=like.device).sign()


def _conv_forward_with_estimators(dims: int) -> Any:
    def conv(self: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (dims == 2 and self.padding_mode == "zeros" and sampling_active() and kernels_apply(x)
                and conv2d_by_gemm(x, weight.shape, self.stride, self.padding, self.dilation, self.groups)):
            # small maps while sampling: one GEMM for all samples under vmap (see bayesify._batched)
            return SampleConv2d.apply(x, weight, bias, self.stride, self.padding, self.dilation)
        return self._conv_forward(x, weight, bias)

    def forward(self: Any, input: Tensor) -> Tensor:
        if self._own_noise():
            return self._estimated(input, lambda x, w, b: conv(self, x, w, b), dims)
        return conv(self, input, self.weight, self.bias)  # weight read once: with recompute_samples a read draws

    return forward


def _conv_transpose_forward_with_estimators(dims: int) -> Any:
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]

    def forward(self: Any, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for {self.point_type.__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, dims, self.dilation)

        def apply(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return conv_t(x, w, b, self.stride, self.padding, output_padding, self.groups, self.dilation)

        if self._own_noise():
            return self._estimated(input, apply, dims)
        return apply(input, self.weight, self.bias)

    return forward


def _layer(point: type[nn.Module]) -> Any:
    """``__init__`` of a variational layer: the point layer's, then its sites."""

    def __init__(self: Any, *args: Any, prior: Any = None, variational: Any = None,
                 estimator: str = "reparam", **kwargs: Any) -> None:
        point.__init__(self, *args, **kwargs)
        self._make_sites(prior, variational, estimator)

    return __init__  # type: ignore[return-value]


class VILinear(VILayer, nn.Linear):
    """Bayesian ``nn.Linear``."""

    point_type = nn.Linear
    __init__ = _layer(nn.Linear)

    def forward(self, input: Tensor) -> Tensor:
        if self._own_noise():
            return self._estimated(input, F.linear, 0)
        weight, bias = self.weight, self.bias  # read once: with recompute_samples a read draws
        if sampling_active() and not isinstance(weight, nn.Parameter) and kernels_apply(input):
            return SampleLinear.apply(input, weight, bias)  # per-sample weights (the sampler's)
        return F.linear(input, weight, bias)


class VIConv1d(VILayer, nn.Conv1d):
    """Bayesian ``nn.Conv1d``."""

    point_type = nn.Conv1d
    __init__ = _layer(nn.Conv1d)
    forward = _conv_forward_with_estimators(1)


class VIConv2d(VILayer, nn.Conv2d):
    """Bayesian ``nn.Conv2d``."""

    point_type = nn.Conv2d
    __init__ = _layer(nn.Conv2d)
    forward = _conv_forward_with_estimators(2)


class VIConv3d(VILayer, nn.Conv3d):
    """Bayesian ``nn.Conv3d``."""

    point_type = nn.Conv3d
    __init__ = _layer(nn.Conv3d)
    forward = _conv_forward_with_estimators(3)


class VIConvTranspose1d(VILayer, nn.ConvTranspose1d):
    """Bayesian ``nn.ConvTranspose1d``."""

    point_type = nn.ConvTranspose1d
    __init__ = _layer(nn.ConvTranspose1d)
    forward = _conv_transpose_forward_with_estimators(1)


class VIConvTranspose2d(VILayer, nn.ConvTranspose2d):
    """Bayesian ``nn.ConvTranspose2d``."""

    point_type = nn.ConvTranspose2d
    __init__ = _layer(nn.ConvTranspose2d)
    forward = _conv_transpose_forward_with_estimators(2)


class VIConvTranspose3d(VILayer, nn.ConvTranspose3d):
    """Bayesian ``nn.ConvTranspose3d``."""

    point_type = nn.ConvTranspose3d
    __init__ = _layer(nn.ConvTranspose3d)
    forward = _conv_transpose_forward_with_estimators(3)


class VILayerNorm(VILayer, nn.LayerNorm):
    """Bayesian ``nn.LayerNorm`` (its affine weight and bias)."""

    point_type = nn.LayerNorm
    __init__ = _layer(nn.LayerNorm)

    def forward(self, input: Tensor) -> Tensor:
        if not self._own_noise():
            weight, bias = self.weight, self.bias  # read once: with recompute_samples a read draws
            if sampling_active() and weight is not None and not isinstance(weight, nn.Parameter):
                # Per-sample affine parameters (the sampler substituted them): under vmap,
                # layer_norm is decomposed and autograd keeps the normalised input as well.
                return _LayerNormAffine.apply(input, weight, bias, tuple(self.normalized_shape), self.eps)[0]
            return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)
        # An elementwise affine map: "local" and "flipout" both reduce to local
        # reparameterisation (independent noise per output element), which is cheap here.
        y = F.layer_norm(input, self.normalized_shape, None, None, self.eps)
        weight, bias = self._parameters.get("weight"), self._parameters.get("bias")
        mu = y if weight is None else y * weight
        mu = mu if bias is None else mu + bias
        w_std = None if weight is None else self._site_std("weight")
        b_std = None if bias is None else self._site_std("bias")
        if w_std is None and b_std is None:
            return mu
        var = (y * y * (w_std * w_std)) if w_std is not None else torch.zeros_like(mu)
        var = var if b_std is None else var + b_std * b_std
        return mu + _safe_sqrt(var) * torch.randn_like(mu)


class _LayerNormAffine(torch.autograd.Function):
    """``F.layer_norm`` with weight (and bias) that keeps only its input and the per-row
    statistics for backward. Under vmap with per-sample affine parameters PyTorch decomposes
    layer_norm and autograd keeps the normalised input as well (186 MB in a MiniLM training
    step); here backward recomputes it, and the input gradient comes from the fused
    ``native_layer_norm_backward`` with the weight folded into the incoming gradient
    (MiniLM-sized LayerNorm, 10 samples: forward + backward 62 -> 37 ms, plain autograd 31 ms)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, shape: tuple[int, ...], eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, rstd = torch.native_layer_norm(x, shape, None, None, eps)
        y = y * weight
        return (y if bias is None else y + bias), mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, bias, shape, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape, ctx.has_bias = shape, bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx: Any, g: Tensor, _gmean: Tensor | None, _grstd: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        lead = tuple(range(x.dim() - len(ctx.shape)))
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.native_layer_norm_backward(g * weight, x, list(ctx.shape), mean, rstd, None, None,
                                                           [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            gw = (g * ((x - mean) * rstd)).sum(lead)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(lead)
        return gx, gw, gb, None, None


class VIEmbedding(VILayer, nn.Embedding):
    """Bayesian ``nn.Embedding``."""

    point_type = nn.Embedding
    __init__ = _layer(nn.Embedding)

    def _samples_in_layer(self, name: str, tied: bool) -> bool:
        """Under any estimator, the table draws only the rows it looks up (in its forward) where
        it can: the default pair (MeanFieldNormal posterior, Normal prior: elementwise std and a
        closed-form KL, which replaces the table's share of ``log_probs``), a plain lookup, and
        a table not tied to another module's weight (GPT-2's lm_head needs every row)."""
        return super()._samples_in_layer(name, tied) or (name == "weight" and not tied and self._rows_sampled())

    def _rows_sampled(self) -> bool:
        spec = getattr(self, "_vi_sites", {}).get("weight")
        return (spec is not None and type(spec.variational) is MeanFieldNormal and type(spec.prior) is Normal
                and self.max_norm is None and not self.scale_grad_by_freq and not self.sparse)

    def forward(self, input: Tensor) -> Tensor:
        weight = self._parameters["weight"]
        if not sampling_active():
            return super().forward(input)
        if not isinstance(weight, nn.Parameter):  # the sampler substituted a whole sampled table
            if self.max_norm is None and not self.scale_grad_by_freq and not self.sparse:
                return self._lookup(input, weight)
            return super().forward(input)
        spec = getattr(self, "_vi_sites", {}).get("weight")
        if spec is None or spec.variational.deterministic:
            return super().forward(input)
        # Draw only the looked-up rows: one draw per distinct row per weight sample (the
        # same row wherever a token repeats, as with a sampled table), never a
        # (samples, vocab, dim) tensor. vmap(randomness="different") makes randn_like
        # independent across samples.
        uniq, inv = torch.unique(input, return_inverse=True)
        vparams = {k: getattr(self, f"weight_{k}") for k in spec.vkeys}
        mean_rows = weight.index_select(0, uniq)
        std = spec.variational.std(mean_rows, {k: v.index_select(0, uniq) for k, v in vparams.items()})
        rows = mean_rows + std * torch.randn_like(mean_rows)
        return self._lookup(inv, rows, pad=input)

    def _lookup(self, input: Tensor, weight: Tensor, pad: Tensor | None = None) -> Tensor:
        # F.embedding under vmap with per-sample tables copies the whole (samples, vocab, dim)
        # tensor into another layout first; index_select batches without that copy.
        out = weight.index_select(0, input.reshape(-1)).view(*input.shape, weight.shape[-1])
        if self.padding_idx is not None:  # F.embedding's rule: no gradient for the padding row
            pad = ((input if pad is None else pad) == self.padding_idx).unsqueeze(-1)
            out = torch.where(pad, out.detach(), out)
        return out


#: The exact-type rules ``bayesify()`` uses; pass a merged dict to extend them.
DEFAULT_MAPPING: dict[type[nn.Module], type[VILayer]] = {
    cls.point_type: cls
    for cls in (VILinear, VIConv1d, VIConv2d, VIConv3d, VIConvTranspose1d, VIConvTranspose2d,
                VIConvTranspose3d, VILayerNorm, VIEmbedding)
}
