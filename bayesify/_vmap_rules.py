"""Per-operator adaptations for the vmapped sampled call, each scoped to that call.

:func:`vmap_rules` is entered inside the function ``torch.vmap`` runs over the samples, on the
calling thread only: a :class:`torch.overrides.TorchFunctionMode` (PyTorch keeps the mode stack
per thread), so another thread calling PyTorch meanwhile, or a second thread sampling its own
model, sees nothing of this one's rules. Nothing is replaced process-wide. The rules:

- attention: ``F.scaled_dot_product_attention`` with an input batched over the samples folds
  the samples into the batch (``_batched.SampleAttention``); PyTorch has no batching rule for
  the CPU flash kernel and runs it sample by sample. Attention whose inputs depend on no sampled
  weight (the frozen prefix of a partial conversion) is PyTorch's own call, run once.
- BatchNorm in eval mode (running statistics shared by the samples): the samples fold into the
  batch, one call as the point model's (``_batched.SampleBatchNorm``); PyTorch's rule runs
  the affine as two more passes (~5x slower).
- stochastic depth: torchvision's ``stochastic_depth`` draws its drop mask into ``torch.empty``,
  a tensor vmap does not batch, so vmap refused it ("different inplace randomness on an
  unbatched tensor"). Inside the sampled call that one allocation is batched over the samples,
  so every sample drops its own rows, as the per-sample loop does.

BatchNorm in training mode is handled by substitution, not interception: each sample
normalises with its own batch statistics from per-sample copies of the running statistics
(:func:`batchnorm_state`), and the stored statistics then move by the mean over samples of the
per-sample updates (:class:`BatchNormUpdate`). Inside the call each such BatchNorm is intercepted
too: one call of the point model's kernel over ``S x C`` channels (``_batched.SampleBatchNormTrain``),
where PyTorch's rule adds the affine in further passes in another layout.

The mode's cost: it sees every PyTorch call of the forward once per vmapped call (not per
sample; backward runs after the mode is gone), ~1.1 us each over a plain call; a sampled
MiniLM forward makes 274 such calls, ~0.3 ms against ~1.7 s of compute (10 samples x 4 x 32
tokens, one thread). A process-wide replacement of the attention function costs nothing per
call but is seen by every thread.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ._batched import SDPA, SampleAttention, SampleBatchNorm, SampleBatchNormTrain, kernels_apply

__all__ = ["vmap_rules", "batchnorm_state", "BatchNormUpdate"]

_is_batched = torch._C._functorch.is_batchedtensor


class _SampledCallRules(TorchFunctionMode):
    """The rules above, for one vmapped call; ``index`` is the sample index (batched)."""

    def __init__(self, index: Tensor) -> None:
        super().__init__()
        self.index = index

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is SDPA:
            return _attention(*args, **kwargs)
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is torch.empty and _from_stochastic_depth(sys._getframe(1)):
            mask = func(*args, **kwargs).zero_()  # the drop mask: batched, so each sample draws its own
            return mask + self.index.to(mask.dtype).mul(0)
        return func(*args, **kwargs)


def vmap_rules(index: Tensor | None) -> Any:
    """The rules for the vmapped call whose sample index is ``index`` (a context manager);
    none for the per-sample loop (``index`` None) or while compiling (Dynamo traces PyTorch's
    own functions)."""
    if index is None or torch.compiler.is_compiling():
        return nullcontext()
    return _SampledCallRules(index)


def _attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> Tensor:
    options = (("dropout_p", dropout_p), ("is_causal", is_causal), ("scale", scale), ("enable_gqa", enable_gqa))
    batched = any(t is not None and _is_batched(t) for t in (query, key, value, attn_mask))
    if not batched or not kernels_apply(query):  # no input depends on a sampled weight: one call
        return SDPA(query, key, value, attn_mask=attn_mask, **dict(options))
    return SampleAttention.apply(query, key, value, attn_mask, options)


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
                bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm``; in eval mode with statistics and affine shared by the samples, folded; in
    training mode with an input batched over the samples, folded (``TRAIN_BATCHNORM_FOLD``)."""
    if (training and TRAIN_BATCHNORM_FOLD and _is_batched(input) and input.dim() >= 2
            and input.numel() > input.shape[1]  # else F.batch_norm's "more than 1 value per channel" error
            and isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and kernels_apply(input)
            and all(t is None or _is_batched(t) for t in (running_mean, running_var))):
        return SampleBatchNormTrain.apply(input, weight, bias, running_mean, running_var, float(momentum), eps,
                                          torch.backends.cudnn.enabled)
    shared = all(t is None or not _is_batched(t) for t in (weight, bias, running_mean, running_var))
    if (training or running_mean is None or running_var is None or not shared or not _is_batched(input)
            or input.dim() < 2 or not kernels_apply(input)):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return SampleBatchNorm.apply(input, weight, bias, running_mean, running_var, eps, torch.backends.cudnn.enabled)


#: Whether training-mode BatchNorm in the vmapped call folds the samples into the channels, one call
#: of the point model's kernel (``_batched.SampleBatchNormTrain``); False: PyTorch's batching rule
#: (the A/B switch).
TRAIN_BATCHNORM_FOLD = True


def _from_stochastic_depth(frame: Any) -> bool:
    """Whether ``frame`` runs torchvision's ``stochastic_depth`` (not imported: it cannot)."""
    tv = sys.modules.get("torchvision.ops.stochastic_depth")
    fn = getattr(tv, "stochastic_depth", None)
    return fn is not None and frame.f_code is getattr(fn, "__code__", None)


def batchnorm_state(root: nn.Module, n: int) -> tuple[dict[str, Tensor], list[tuple[nn.Module, str, Tensor, str]]]:
    """Per-sample copies ``(n, *shape)`` of the running statistics of every BatchNorm under
    ``root`` that updates them in this forward, by qualified name, and the write-back list
    ``(module, buffer name, copy, qualified name)``."""
    batched: dict[str, Tensor] = {}
    writeback: list[tuple[nn.Module, str, Tensor, str]] = []
    for prefix, mod in root.named_modules():
        if isinstance(mod, _BatchNorm) and mod.training and mod.track_running_stats:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                buf = mod._buffers.get(key)
                if buf is None:
                    continue
                qual = f"{prefix}.{key}" if prefix else key
                copy = buf.unsqueeze(0).repeat(n, *([1] * buf.dim()))
                batched[qual] = copy
                writeback.append((mod, key, copy, qual))
    return batched, writeback


class BatchNormUpdate:
    """The running statistics' update of one sampled call: every chunk of samples starts from
    the same stored statistics; the update is the mean over all samples of their updated
    copies (``num_batches_tracked``: the same in every sample)."""

    def __init__(self) -> None:
        self._sum: dict[tuple[int, str], tuple[nn.Module, str, Tensor]] = {}

    def add(self, writeback: list[tuple[nn.Module, str, Tensor, str]]) -> None:
        for mod, key, copy, _ in writeback:
            if key == "num_batches_tracked":
                part = copy[0]
            else:
                part = copy.detach().sum(0)
                if (id(mod), key) in self._sum:
                    part = self._sum[(id(mod), key)][2] + part
            self._sum[(id(mod), key)] = (mod, key, part)

    def commit(self, n: int) -> None:
        with torch.no_grad():
            for mod, key, total in self._sum.values():
                mod._buffers[key].copy_(total if key == "num_batches_tracked" else total / n)
