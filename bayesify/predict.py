"""Predictive summaries of a Bayesian model: ``bf.predict(bnn, x, samples=100)``.

The model is run ``samples`` times (one vectorised call per batch) in eval mode under
``torch.no_grad`` (with ``dropout=True`` its dropout layers stay on, each sample with its own
masks: ``bayesify._dropout``); the sampled outputs are reduced per input to

- ``likelihood="categorical"`` (the model outputs logits over the last dimension):
  ``probs`` (the mean of the per-sample softmax), ``entropy`` (total uncertainty),
  ``expected_entropy`` (aleatoric) and ``mutual_information`` (epistemic,
  ``entropy - expected_entropy``), in nats;
- ``likelihood="normal"`` (the model outputs the predicted mean):
  ``mean``, ``variance = epistemic_variance + aleatoric_variance``, where
  ``epistemic_variance`` is the variance of the sampled means and
  ``aleatoric_variance`` is ``noise_std ** 2`` (0 when not given).

Every batch is evaluated with the *same* ``samples`` weight draws (the generator is
rewound before each batch), so batching never changes the result and the summaries of
all inputs come from one set of posterior samples. The weights are drawn once per call
and kept for the later batches (up to ``bayesify._reuse.REUSE_MAX_BYTES`` of samples, and not with a
``chunk_size`` below ``samples``, which asks for less memory); past that, each batch draws
them again from the rewound generator: the same values either way. (Layers with ``estimator="local"`` or
``"flipout"`` draw their noise per input instead: there a different batching gives a
different, equally valid, Monte Carlo draw.)

Example::

    >>> pred = bf.predict(bnn, x_test, samples=100)
    >>> pred.probs.shape, pred.mutual_information.shape
    (torch.Size([500, 10]), torch.Size([500]))
    >>> pred = bf.predict(bnn, test_loader, likelihood="normal", noise_std=0.1, progress=True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ._choices import lookup
from ._dropout import dropout_on
from ._state import in_forward_stream
from .loss import LIKELIHOODS, first_tensor
from . import _reuse
from ._reuse import reusing_draws
from .module import VIModule, check_optional_positive_int, check_samples
from .sites import iter_sites

__all__ = ["predict", "Prediction"]

#: Keys of a mapping batch that are targets, not model inputs.
_TARGET_KEYS = ("labels", "label")


@dataclass
class Prediction:
    """Per-input predictive summaries returned by :func:`predict`.

    Fields that do not apply to ``likelihood`` are ``None``. Shapes are those of one
    model output without the sample dimension (``probs``: ``(N, C)``; ``entropy``,
    ``expected_entropy``, ``mutual_information``: ``(N,)``; regression fields: ``(N, *)``).
    ``sample_probs`` / ``sample_means`` ``(samples, N, ...)`` are kept only with
    ``keep_samples=True``.
    """

    likelihood: str
    samples: int
    # categorical
    probs: Tensor | None = None
    entropy: Tensor | None = None
    expected_entropy: Tensor | None = None
    mutual_information: Tensor | None = None
    sample_probs: Tensor | None = None
    # normal
    mean: Tensor | None = None
    variance: Tensor | None = None
    epistemic_variance: Tensor | None = None
    aleatoric_variance: Tensor | None = None
    sample_means: Tensor | None = None

    def __repr__(self) -> str:
        parts = [f"likelihood={self.likelihood!r}", f"samples={self.samples}"]
        for f in fields(self)[2:]:
            value = getattr(self, f.name)
            if value is not None:
                parts.append(f"{f.name}=<{tuple(value.shape)}>")
        return f"Prediction({', '.join(parts)})"


# -- inputs ---------------------------------------------------------------------------------------
_Call = tuple[tuple[Any, ...], dict[str, Any]]


def _model_device(model: torch.nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def _to(x: Any, device: torch.device | None) -> Any:
    return x.to(device) if isinstance(x, Tensor) and device is not None and x.device != device else x


def _call_of(batch: Any, device: torch.device | None, where: str) -> _Call:
    """``(args, kwargs)`` for the model from one batch: a tensor, a mapping, or a tuple (first item)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{where} is an empty {type(batch).__name__}; expected (x, ...) with x a tensor")
        batch = batch[0]
    if isinstance(batch, Tensor):
        return (_to(batch, device),), {}
    if isinstance(batch, Mapping):
        return (), {k: _to(v, device) for k, v in batch.items() if k not in _TARGET_KEYS}
    raise TypeError(f"{where} must be a tensor, a mapping of model inputs or a tuple (x, y, ...) "
                    f"whose first item is one of those, got {type(batch).__name__}")


def _slice(x: Tensor | Mapping, start: int, stop: int) -> Any:
    if isinstance(x, Tensor):
        return x[start:stop]
    return {k: v[start:stop] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in x.items()}


def _batches(x: Any, batch_size: int | None, device: torch.device | None) -> tuple[Iterator[_Call], int | None]:
    """The model calls for ``x`` and their number (None when unknown)."""
    if isinstance(x, (Tensor, Mapping)):
        if batch_size is None:
            return iter([_call_of(x, device, "x")]), 1
        if isinstance(x, Tensor):
            if x.dim() == 0:
                raise ValueError("x is a 0-d tensor; batch_size needs a leading batch dimension")
            n = x.shape[0]
        else:
            lens = {v.shape[0] for v in x.values() if isinstance(v, Tensor) and v.dim() > 0}
            if len(lens) != 1:
                raise ValueError(f"to batch a mapping, its tensors need one common leading size, got {sorted(lens)}")
            n = lens.pop()
        starts = range(0, n, batch_size)
        return (_call_of(_slice(x, s, s + batch_size), device, "x") for s in starts), len(starts)
    if isinstance(x, (str, bytes)) or not isinstance(x, Iterable):
        raise TypeError("x must be a tensor, a mapping of model inputs, or an iterable of batches "
                        f"(e.g. a DataLoader), got {type(x).__name__}")
    if batch_size is not None:
        raise ValueError("batch_size applies to a tensor x; an iterable of batches (e.g. a DataLoader) "
                         "is already batched: pass batch_size=None")
    try:
        total: int | None = len(x)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return (_call_of(b, device, f"batch {i}") for i, b in enumerate(x)), total


# -- reductions -----------------------------------------------------------------------------------
def _summarise_categorical(pred: Tensor, keep: bool) -> dict[str, Tensor]:
    if pred.dim() < 2:
        raise ValueError(f"expected logits with a sample and a class dimension, got shape {tuple(pred.shape)}")
    logits = pred if pred.dtype in (torch.float32, torch.float64) else pred.float()
    sample_probs = torch.softmax(logits, dim=-1)
    probs = sample_probs.mean(0)
    # entr(p) = -p log p with entr(0) = 0.
    entropy = torch.special.entr(probs).sum(-1)
    expected = torch.special.entr(sample_probs).sum(-1).mean(0)
    # Mutual information is >= 0 (Jensen); clamp float round-off only.
    out = {"probs": probs, "entropy": entropy, "expected_entropy": expected,
           "mutual_information": (entropy - expected).clamp_min(0)}
    if keep:
        out["sample_probs"] = sample_probs
    return out


def _summarise_normal(pred: Tensor, noise_var: Tensor | None, keep: bool) -> dict[str, Tensor]:
    means = pred if pred.dtype in (torch.float32, torch.float64) else pred.float()
    mean = means.mean(0)
    # Population variance (correction=0): the variance of the equally weighted sample mixture.
    epistemic = means.var(0, correction=0)
    if noise_var is None:
        aleatoric = torch.zeros_like(mean)
    else:
        nv = noise_var.to(device=mean.device, dtype=mean.dtype)
        try:
            aleatoric = torch.broadcast_to(nv, mean.shape).clone()
        except RuntimeError:
            raise ValueError(f"noise_std of shape {tuple(nv.shape)} does not broadcast to the predicted "
                             f"mean of shape {tuple(mean.shape)}") from None
    out = {"mean": mean, "variance": epistemic + aleatoric, "epistemic_variance": epistemic,
           "aleatoric_variance": aleatoric}
    if keep:
        out["sample_means"] = means
    return out


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    if len(parts) == 1:
        return parts[0]
    # Summaries are batch-first; kept samples carry the sample dimension first.
    return {k: torch.cat([p[k] for p in parts], dim=1 if k.startswith("sample_") else 0) for k in parts[0]}


# -- checks and helpers -----------------------------------------------------------------------------
def _noise_variance(noise_std: Any, likelihood: str) -> Tensor | None:
    if noise_std is None:
        return None
    if likelihood != "normal":
        raise ValueError(f"noise_std applies only to likelihood='normal', not {likelihood!r}")
    if isinstance(noise_std, Tensor):
        std = noise_std.detach()
        if not std.is_floating_point():
            std = std.float()
    elif isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool):
        std = torch.tensor(float(noise_std))
    else:
        raise TypeError(f"noise_std must be a positive number or a tensor, got {type(noise_std).__name__}")
    if not bool(torch.isfinite(std).all()) or bool((std < 0).any()):
        raise ValueError("noise_std must be finite and non-negative (a standard deviation, e.g. "
                         "loss_fn.noise_std of a trained ELBOLoss)")
    return std.square()


def _default_generator(model: VIModule) -> torch.Generator | None:
    """A generator seeded from the global RNG, so that every batch reuses the same weight draws."""
    devices = {s.mean.device for s in iter_sites(model)}
    if len(devices) > 1:
        return None  # sites on several devices: one generator cannot serve them all
    device = devices.pop() if devices else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(torch.randint(0, 2**62, (1,))))
    return gen


#: ``progress=None`` shows a bar when the estimated time of the remaining batches exceeds this.
AUTO_PROGRESS_SECONDS = 2.0


@contextmanager
def _progress(enabled: bool | None, total: int | None) -> Iterator[Callable[[], None]]:
    """A callback advancing a rich progress bar (on stderr) by one batch. ``enabled=None``: only
    on an interactive terminal or notebook, started once the first batches tell that the rest
    will take more than ``AUTO_PROGRESS_SECONDS``."""
    if enabled is False:
        yield lambda: None
        return
    import time

    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if enabled is None and not (console.is_interactive or console.is_jupyter):
        yield lambda: None
        return
    bar = Progress(console=console, transient=enabled is None)
    task = bar.add_task("predict", total=total)
    t0, done, shown = time.perf_counter(), 0, False

    def advance() -> None:
        nonlocal done, shown
        done += 1
        bar.advance(task)
        if not shown:
            elapsed = time.perf_counter() - t0
            left = elapsed / done * (total - done) if total is not None else elapsed
            if enabled or left > AUTO_PROGRESS_SECONDS:
                bar.start()
                shown = True

    try:
        if enabled:
            bar.start()
            shown = True
        yield advance
    finally:
        if shown:
            bar.stop()


def _linearized(model: VIModule, args: tuple, kwargs: dict, means: dict[str, Tensor], tangents: dict[str, Tensor],
                chunk_size: int | None, n: int) -> Tensor:
    """``f(x, mean) + J(x) (w_s - mean)`` ``(S, ...)`` for the drawn perturbations ``tangents``."""
    from ._linearize import linearized_outputs

    if not tangents:  # no site has a spread: every sample is the output at the means
        from ._linearize import at_means, mean_output

        with at_means(model):
            primal = mean_output(model, {}, args, kwargs)
        return primal.unsqueeze(0).expand(n, *primal.shape).detach()
    primal, jt = linearized_outputs(model, args, kwargs, means, tangents, chunk_size)
    return (primal.unsqueeze(0) + jt).detach()


# -- public -------------------------------------------------------------------------------------
def predict(
    model: VIModule,
    x: Any,
    samples: int = 100,
    likelihood: str = "categorical",
    batch_size: int | None = None,
    progress: bool | None = None,
    generator: torch.Generator | None = None,
    noise_std: float | Tensor | None = None,
    keep_samples: bool = False,
    chunk_size: int | None = None,
    linearized: bool | None = None,
    dropout: bool = False,
) -> Prediction:
    """Predictive summaries of ``model`` on ``x`` from ``samples`` posterior samples.

    Args:
        model: a :class:`bayesify.VIModule` (e.g. from ``bf.bayesify``); its output (tensor,
            tuple, dict or ``ModelOutput``) is reduced via its prediction tensor (``.logits``
            or the first tensor).
        x: a tensor, a mapping of model inputs (e.g. tokenizer output; ``labels`` is dropped),
            or an iterable of batches such as a ``DataLoader`` (each batch a tensor, a mapping,
            or a tuple ``(x, y, ...)`` of which only ``x`` is used). Tensors are moved to
            the model's device; results are concatenated along the batch dimension.
        samples: number of posterior samples (a positive int).
        likelihood: ``"categorical"`` (the model outputs logits) or ``"normal"`` (it outputs
            the predicted mean).
        batch_size: split a tensor / mapping ``x`` into batches of this size.
        progress: ``True``: a rich progress bar on stderr; ``False``: nothing is printed; ``None``
            (default): a bar on an interactive terminal or notebook when, after the first batch,
            the rest will take more than about 2 s.
        generator: a ``torch.Generator`` on the model's device for reproducible samples; by
            default one is seeded from the global RNG (so ``torch.manual_seed`` applies).
        noise_std: observation noise of the normal likelihood (a number or a tensor that
            broadcasts to one batch of outputs): ``aleatoric_variance = noise_std ** 2``.
        keep_samples: also return the per-sample ``sample_probs`` / ``sample_means``.
        chunk_size: evaluate (and draw the weights of) at most this many samples at once:
            memory for many samples of a large model; on CPU the same result as without it.
        linearized: the linearised predictive ``f(x, mean) + J(x) (w_s - mean)`` (forward-mode AD,
            vectorised over the samples) instead of running the network on each weight sample;
            the predictive for Laplace posterior spreads (``bf.laplace``). Default: what
            ``bf.laplace`` / ``bf.calibrate`` recorded in ``model.predictive``, else False.
        dropout: keep the model's own dropout layers (``nn.Dropout`` and its family, ``p > 0``)
            on: each weight sample also draws its own dropout masks, so the predictive is the
            Gaussian posterior's and dropout's together (MC dropout as variational inference,
            Gal & Ghahramani 2016); with ``variational="pointmass"`` it is MC dropout. Only those
            layers leave eval mode (BatchNorm keeps its running statistics). The masks follow
            ``generator`` (bit-reproducible), one independent stream per batch (so a different
            batching, or ``chunk_size``, gives another, equally valid, draw of the masks; the weight
            samples stay the same). ``ValueError`` for a model without such a layer, or with the
            linearised predictive (it linearises one deterministic network). Default False: eval
            mode, dropout off.

    A softmax temperature chosen by ``bf.calibrate`` (``model.predictive``) divides the logits.

    The model runs in eval mode (but its dropout layers with ``dropout=True``) under
    ``torch.no_grad``; its train/eval modes are restored.
    """
    if not isinstance(model, VIModule):
        raise TypeError(f"predict expects a bayesify.VIModule (e.g. bf.bayesify(model)), "
                        f"got {type(model).__name__}")
    n = check_samples(samples)
    kind = lookup("likelihood", likelihood, LIKELIHOODS)
    check_optional_positive_int("batch_size", batch_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_optional_positive_int("chunk_size", chunk_size)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")
    noise_var = _noise_variance(noise_std, kind)
    calls, total = _batches(x, batch_size, _model_device(model))
    settings = getattr(model, "predictive", None) or {}
    if linearized is None:
        linearized = bool(settings.get("linearized", False))
    elif not isinstance(linearized, bool):
        raise TypeError(f"linearized must be True, False or None, got {linearized!r}")
    temperature = float(settings.get("softmax_temperature", 1.0)) if kind == "categorical" else 1.0
    if not isinstance(dropout, bool):
        raise TypeError(f"dropout must be True or False, got {dropout!r}")
    if dropout and linearized:
        raise ValueError("dropout=True needs the sampled predictive; the linearised one (linearized=True"
                         + ("" if "linearized" not in settings else ", recorded by bf.laplace / bf.calibrate")
                         + ") runs one deterministic network: pass linearized=False")
    masks = dropout_on(model) if dropout else nullcontext()

    gen = generator if generator is not None else _default_generator(model)
    start = gen.get_state() if gen is not None else None
    after_one: Tensor | None = None
    modes = [(m, m.training) for m in model.modules()]
    parts: list[dict[str, Tensor]] = []
    tangents = means = None
    # Draw the weights once for all batches (each batch asks for the same draws): not where
    # chunk_size asks that fewer than all samples be in memory at once.
    reuse = gen is not None and not linearized and (chunk_size is None or chunk_size >= n)
    try:
        model.eval()
        with (masks, torch.no_grad(), _progress(progress, total) as advance,
              reusing_draws(model, _reuse.REUSE_MAX_BYTES if reuse else 0)):
            if linearized:
                from ._linearize import perturbations, site_means, spread_sites

                factors = getattr(model, "posterior_factors", None)
                sites = spread_sites(list(iter_sites(model)), factors)
                means = site_means(model, sites)
                tangents = perturbations(sites, n, gen, factors)
                after_one = gen.get_state() if gen is not None else None
            for b, (args, kwargs) in enumerate(calls):
                if linearized:
                    pred = _linearized(model, args, kwargs, means, tangents, chunk_size, n)
                else:
                    if gen is not None:
                        gen.set_state(start)  # the same weight draws for every batch
                    with in_forward_stream(b) if dropout else nullcontext():
                        out = model(*args, samples=n, generator=gen, chunk_size=chunk_size, **kwargs)
                    if gen is not None and after_one is None:
                        after_one = gen.get_state()
                    pred = first_tensor(out)
                if temperature != 1.0:
                    pred = pred / temperature
                if pred.dim() == 0 or pred.shape[0] != n:
                    raise ValueError(f"expected the model output to have a leading sample dimension of "
                                     f"{n}, got shape {tuple(pred.shape)}")
                parts.append(_summarise_categorical(pred, keep_samples) if kind == "categorical"
                             else _summarise_normal(pred, noise_var, keep_samples))
                advance()
    finally:
        for m, mode in modes:
            m.training = mode
        if generator is not None and after_one is not None:
            generator.set_state(after_one)  # advanced as by one call, however many batches
    if not parts:
        raise ValueError("x yielded no batches; nothing to predict")
    return Prediction(likelihood=kind, samples=n, **_concat(parts))
