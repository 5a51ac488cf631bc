"""``bf.fit``: the ELBO training loop for plain PyTorch, with progress and a history.

It replaces this loop (docs/uncertainty.md's recipe)::

    loss_fn = bf.ELBOLoss("categorical", dataset_size=len(train_set))
    spreads = [p for n, p in bnn.named_parameters() if n.endswith("_rho")]
    means = [p for n, p in bnn.named_parameters() if not n.endswith("_rho")]
    opt = torch.optim.Adam([{"params": means, "lr": 1e-3}, {"params": spreads, "lr": 1e-2}])
    bnn.train()                         # ... and the frozen blocks back in eval() by hand
    for epoch in range(epochs):
        for x, y in loader:
            loss = loss_fn(bnn(x, samples=4), y)
            opt.zero_grad(); loss.backward(); opt.step()

Example::

    >>> bnn = bf.bayesify(model, include=["encoder.layer.5", "classifier"])
    >>> history = bf.fit(bnn, loader, epochs=3)        # dataset_size=len(loader.dataset)
    >>> history.epochs[-1]["accuracy"]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .loss import ELBOLoss, first_tensor
from .module import VIModule, check_samples
from .sites import iter_sites

__all__ = ["fit", "History", "param_groups"]

#: Keys of a mapping batch that hold the target.
_TARGET_KEYS = ("labels", "label")
#: Spreads and newly initialised weights move this many times faster than pretrained means.
FAST = 10.0


@dataclass
class History:
    """What ``bf.fit`` measured: one row per step and the mean of each epoch.

    Each row has ``loss``, ``nll``, ``kl`` (nats, all Bayesian weights), ``kl_term`` (what the
    loss adds: ``kl_weight * kl / dataset_size``) and, for a categorical likelihood,
    ``accuracy`` (of the mean prediction over the samples, on the training batch).
    """

    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)

    def __repr__(self) -> str:
        last = ", ".join(f"{k}={v:.4g}" for k, v in (self.epochs[-1] if self.epochs else {}).items())
        return f"History({len(self.steps)} steps, {len(self.epochs)} epochs; last epoch: {last})"


def param_groups(bnn: nn.Module, lr: float = 1e-3, fast: float = FAST) -> list[dict[str, Any]]:
    """Adam parameter groups for ELBO training of the parameters that require grad.

    ``"means"`` at ``lr``: posterior means and every other trained parameter; ``"spreads"`` at
    ``fast * lr``: the variational parameters (``weight_rho``, ...) of every Bayesian site,
    which live on a log scale and must move in a short fine-tune; ``"new"`` at ``fast * lr``:
    the means of newly initialised modules (``bnn.new_modules``, e.g. a new classifier head),
    which start from random values rather than from a network known to work. Names: a
    converted model's parameters are ``model.<original name>``, spreads ``<name>_rho``.
    """
    spreads: dict[int, Tensor] = {}
    for site in iter_sites(bnn):
        for v in site.vparams().values():
            spreads[id(v)] = v
    new_ids: set[int] = set()
    inner = getattr(bnn, "model", None)
    for name in getattr(bnn, "new_modules", []):
        module = inner.get_submodule(name) if isinstance(inner, nn.Module) else None
        if module is not None:
            new_ids.update(id(p) for p in module.parameters() if id(p) not in spreads)
    groups: dict[str, list[Tensor]] = {"means": [], "spreads": [], "new": []}
    seen: set[int] = set()
    for p in bnn.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = "spreads" if id(p) in spreads else "new" if id(p) in new_ids else "means"
        groups[key].append(p)
    rate = {"means": lr, "spreads": fast * lr, "new": fast * lr}
    return [{"params": ps, "lr": rate[k], "name": k} for k, ps in groups.items() if ps]


def fit(
    bnn: VIModule,
    loader: Iterable[Any],
    epochs: int = 1,
    *,
    dataset_size: int | None = None,
    likelihood: str | Callable[[Tensor, Tensor], Tensor] = "categorical",
    lr: float = 1e-3,
    samples: int = 4,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
    loss_fn: ELBOLoss | None = None,
    train: str = "bayesian",
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> History:
    """Train ``bnn`` on the ELBO: ``epochs`` passes over ``loader``, returns a :class:`History`.

    Args:
        loader: batches ``(x, y)`` (``x`` a tensor, a tuple of positional inputs, or a mapping of
            keyword inputs) or mappings with a ``labels`` key (tokenizer output + labels).
            Tensors are moved to the model's device.
        dataset_size: number of training points (the KL is divided by it); default
            ``len(loader.dataset)``.
        likelihood: as in :class:`bayesify.ELBOLoss` (``"categorical"``, ``"normal"``).
        lr: learning rate of the means; spreads and newly initialised modules get ``10 * lr``
            (see :func:`param_groups`).
        samples: weight samples per step (the model's own default, 10, is for prediction).
        optimizer: ``None`` (Adam over :func:`param_groups`), an optimizer, or a factory
            ``optimizer(bnn) -> torch.optim.Optimizer`` (e.g. a natural-gradient one). Each
            step calls ``zero_grad()``, ``loss.backward()`` and ``step()``.
        loss_fn: an :class:`bayesify.ELBOLoss` to use instead of
            ``ELBOLoss(likelihood, dataset_size)``. The loss's parameters (the learned noise of
            ``"normal"``, its default) are trained too, at ``10 * lr``: in the optimizer, or for
            ``bf.optim.IVON`` (Bayesian tensors only) by an Adam of their own.
        train: ``"bayesian"``: only the modules the conversion selected (their means,
            spreads and, e.g., BatchNorm affine parameters); every other parameter is frozen
            for the run. ``"all"``: every parameter that requires grad.
            Either way, modules with nothing to train below them (the frozen blocks, and
            dropout) run in ``eval()`` mode, so they are computed once per batch rather than
            once per sample; modes and ``requires_grad`` flags are restored afterwards.
        max_steps: stop after this many steps in all.
        generator: for the weight samples (reproducible runs).
        progress: a rich progress bar with NLL, KL term and accuracy (on stderr).
    """
    if not isinstance(bnn, VIModule):
        raise TypeError(f"fit expects a bayesify model (bf.bayesify(...) or a bf.VIModule), got {type(bnn).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    check_samples(samples)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if train not in ("bayesian", "all"):
        raise ValueError(f"unknown train {train!r}; valid choices: bayesian, all")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(loader, (torch.Tensor, str, bytes)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"loader must be an iterable of batches (x, y), e.g. a torch.utils.data.DataLoader, "
                        f"got {type(loader).__name__}")
    if loss_fn is None:
        if dataset_size is None:
            dataset_size = _dataset_size(loader)
        loss_fn = ELBOLoss(likelihood, dataset_size=dataset_size)
    elif not isinstance(loss_fn, ELBOLoss):
        raise TypeError(f"loss_fn must be a bayesify.ELBOLoss, got {type(loss_fn).__name__}")
    device = next((p.device for p in bnn.parameters()), torch.device("cpu"))
    loss_fn.to(device)

    flags = {p: p.requires_grad for p in bnn.parameters()}
    modes = {m: m.training for m in bnn.modules()}
    hooks: list[Any] = []
    try:
        if train == "bayesian":
            keep = _selected_parameters(bnn)
            for p in flags:
                p.requires_grad_(flags[p] and id(p) in keep)
        _set_modes(bnn)
        opt = _optimizer(optimizer, bnn, lr, loss_fn)
        hooks.extend(opt.__dict__.pop("_bayesify_fit_hooks", ()))
        return _loop(bnn, loader, epochs, max_steps, samples, opt, loss_fn, device, generator, progress)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def _dataset_size(loader: Any) -> int:
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        raise ValueError("dataset_size is required: pass the number of training points, e.g. "
                         "bf.fit(bnn, loader, dataset_size=len(train_set))") from None


def _selected_parameters(bnn: nn.Module) -> set[int]:
    """ids of the parameters of the modules the conversion selected (converted ones, and e.g. a
    selected BatchNorm); every parameter of a model without a conversion plan."""
    plan = getattr(bnn, "conversion_plan", None)
    inner = getattr(bnn, "model", None)
    if plan is None or not isinstance(inner, nn.Module):
        return {id(p) for p in bnn.parameters()}
    names = [e.name for e in plan.converted]
    names += [s.name for s in plan.skipped if s.reason not in ("not selected by include/exclude", "already Bayesian")]
    keep: set[int] = set()
    for name in names:
        module = inner.get_submodule(name)
        keep.update(id(p) for p in module.parameters(recurse=bool(getattr(type(module), "_vi_layer", False))))
    return keep


def _set_modes(bnn: nn.Module) -> None:
    """train() for the modules with a trained parameter below them, eval() for the rest."""
    bnn.train()
    for m in bnn.modules():
        if not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _optimizer(optimizer: Any, bnn: nn.Module, lr: float, loss_fn: ELBOLoss) -> torch.optim.Optimizer:
    extra = [p for p in loss_fn.parameters() if p.requires_grad]
    if optimizer is None:
        groups = param_groups(bnn, lr)
        if extra:
            groups.append({"params": extra, "lr": FAST * lr, "name": "likelihood"})
        if not groups:
            raise ValueError("nothing to train: no parameter of the model requires grad")
        return torch.optim.Adam(groups)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        opt = optimizer(bnn)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer(bnn) must return a torch.optim.Optimizer, got {type(opt).__name__}")
        if extra:
            from .optim import IVON

            if isinstance(opt, IVON):
                # IVON steps Bayesian tensors only: the loss's parameters (a learned noise) get an
                # Adam of their own, stepped and zeroed after each IVON step (the hook is removed
                # when fit returns).
                companion = torch.optim.Adam(extra, lr=FAST * lr)

                def _step_companion(*_: Any) -> None:
                    companion.step()
                    companion.zero_grad()

                opt._bayesify_fit_hooks = [opt.register_step_post_hook(_step_companion)]
            else:
                opt.add_param_group({"params": extra, "lr": FAST * lr})
        return opt
    raise TypeError("optimizer must be None, a torch.optim.Optimizer, or a callable optimizer(bnn) -> Optimizer; "
                    f"got {type(optimizer).__name__}")


def _split(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor]:
    """(positional inputs, keyword inputs, target) of one batch."""
    if isinstance(batch, Mapping):
        key = next((k for k in _TARGET_KEYS if k in batch), None)
        if key is None:
            raise ValueError(f"a mapping batch needs a 'labels' key with the targets; got keys {sorted(batch)}")
        return (), {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, Mapping):
            return (), dict(x), y
        return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), {}, y
    raise ValueError("each batch must be (x, y) or a mapping with a 'labels' key; "
                     f"got {type(batch).__name__}")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _loop(bnn: VIModule, loader: Iterable[Any], epochs: int, max_steps: int | None, samples: int,
          opt: torch.optim.Optimizer, loss_fn: ELBOLoss, device: torch.device,
          generator: torch.Generator | None, progress: bool) -> History:
    history = History()
    total = None
    try:
        total = epochs * len(loader)  # type: ignore[arg-type]
        total = min(total, max_steps) if max_steps else total
    except TypeError:
        total = max_steps
    categorical = loss_fn.likelihood == "categorical"
    # A loss that takes the closed-form KL reads no log densities: the forward skips them.
    draw_log_probs = getattr(loss_fn, "kl", "mc") != "analytic"
    with _bar(progress, total) as show:
        for epoch in range(epochs):
            rows: list[dict[str, float]] = []
            for batch in loader:
                args, kwargs, y = _split(_to(batch, device))
                out = bnn(*args, samples=samples, generator=generator, log_probs=draw_log_probs, **kwargs)
                loss = loss_fn(out, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                t = loss_fn.last
                row = {"epoch": float(epoch), "loss": t.loss, "nll": t.nll, "kl": t.kl, "kl_term": t.kl_term}
                if categorical:
                    with torch.no_grad():
                        probs = first_tensor(out).detach().softmax(-1).mean(0)
                        row["accuracy"] = float((probs.argmax(-1) == y).float().mean())
                rows.append(row)
                history.steps.append(row)
                show(epoch, row)
                if max_steps is not None and len(history.steps) >= max_steps:
                    break
            if not rows and not (max_steps is not None and len(history.steps) >= max_steps):
                if epoch == 0:
                    raise ValueError("the loader yielded no batches: nothing was trained (an empty dataset, or an "
                                     "iterator already used up?)")
                warnings.warn(f"the loader yielded no batches in epoch {epoch + 1}: training stopped after epoch "
                              f"{epoch}; pass something that can be iterated again (a DataLoader or a list), "
                              "not an iterator", RuntimeWarning, stacklevel=3)
                break
            if rows:
                history.epochs.append({k: sum(r[k] for r in rows) / len(rows) for k in rows[0]})
            if max_steps is not None and len(history.steps) >= max_steps:
                break
    return history


class _bar:
    """A rich progress bar showing the last step's numbers; does nothing when disabled."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self) -> Callable[[int, dict[str, float]], None]:
        if not self.enabled:
            return lambda epoch, row: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("fit"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[stats]}"), console=Console(stderr=True))
        self.progress.__enter__()
        task = self.progress.add_task("fit", total=self.total, stats="")

        def show(epoch: int, row: dict[str, float]) -> None:
            acc = f"  acc {row['accuracy']:.3f}" if "accuracy" in row else ""
            self.progress.update(task, advance=1, stats=f"epoch {epoch + 1}  nll {row['nll']:.4f}  "
                                                        f"kl {row['kl_term']:.4g}{acc}")
        return show

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)
