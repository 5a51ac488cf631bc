"""Train a converted model with PyTorch Lightning: :class:`BayesianLightningModule`.

A ``LightningModule`` around a Bayesian model (``bf.bayesify(model)`` or a ``bf.VIModule``):
``training_step`` is the negative ELBO of ``samples`` weight samples and logs
``train_loss``, ``train_nll`` and ``train_kl``; ``validation_step`` / ``test_step`` collect the
predictive distribution of ``eval_samples`` samples and log ``val_accuracy``, ``val_nll``,
``val_ece``, ``val_brier`` (``test_*`` for testing) at the end of the epoch;
``configure_optimizers`` is Adam with the spreads in their own group.

Example::

    >>> from bayesify.integrations.lightning import BayesianLightningModule
    >>> module = BayesianLightningModule(bf.bayesify(net), dataset_size=len(train_set))
    >>> lightning.Trainer(max_epochs=5).fit(module, train_loader, val_loader)

Batches are ``(x, y)`` tuples (``x`` a tensor, or a mapping of model inputs) or mappings
with a ``labels`` key (the rest are model inputs). Subclass and override
:meth:`split_batch` for other layouts, :meth:`configure_optimizers` for another optimizer.
"""

from __future__ import annotations

from typing import Any, Mapping

import lightning
import torch
from torch import Tensor, nn

from ..loss import ELBOLoss
from ..module import check_samples
from ._common import ELBOTracker, calibration, check_model, param_groups, predictive

__all__ = ["BayesianLightningModule"]


class BayesianLightningModule(lightning.LightningModule):
    """Variational training and calibrated evaluation of ``bnn`` in Lightning.

    Args:
        bnn: the Bayesian model (``bf.bayesify(model)``); available as ``self.bnn``.
        dataset_size: the number of training points (divides the KL).
        likelihood: ``"categorical"`` (logits; calibration metrics) or ``"normal"``
            (regression; validation logs the Gaussian NLL of the sampled means only).
        samples / eval_samples: weight samples per training / evaluation step.
        lr / spread_lr: Adam learning rates of the means and of the spreads (``*_rho``).
        kl_weight: multiplies the KL term (1.0 is the ELBO).
        loss_fn: a ``bf.ELBOLoss`` to use instead of one built from the arguments above.
    """

    def __init__(self, bnn: nn.Module, dataset_size: int | None = None, likelihood: str = "categorical",
                 samples: int = 4, eval_samples: int = 20, lr: float = 1e-3, spread_lr: float = 1e-2,
                 kl_weight: float = 1.0, loss_fn: ELBOLoss | None = None) -> None:
        super().__init__()
        self.bnn = check_model(bnn, "BayesianLightningModule")
        if loss_fn is None:
            loss_fn = ELBOLoss(likelihood, dataset_size=dataset_size, kl_weight=kl_weight)
        elif not isinstance(loss_fn, ELBOLoss):
            raise TypeError(f"loss_fn must be a bf.ELBOLoss, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.samples, self.eval_samples = check_samples(samples), check_samples(eval_samples)
        for name, value in (("lr", lr), ("spread_lr", spread_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.lr, self.spread_lr = float(lr), float(spread_lr)
        self._tracker = ELBOTracker(loss_fn)
        self._eval: dict[str, list[Tensor]] = {}

    # -- hooks ------------------------------------------------------------------------------------
    def split_batch(self, batch: Any) -> tuple[tuple, dict[str, Any], Tensor]:
        """``(args, kwargs, target)`` of one batch: ``(x, y, ...)`` or a mapping with ``labels``."""
        if isinstance(batch, Mapping):
            kwargs = dict(batch)
            for key in ("labels", "label"):
                if key in kwargs:
                    return (), kwargs, kwargs.pop(key)
            raise ValueError(f"a mapping batch needs a 'labels' key, got keys {sorted(kwargs)}")
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            x, y = batch[0], batch[1]
            return ((), dict(x), y) if isinstance(x, Mapping) else ((x,), {}, y)
        raise ValueError("expected a batch (x, y, ...) or a mapping with 'labels'; "
                         f"got {type(batch).__name__}; override split_batch() for other layouts")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.bnn(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        args, kwargs, y = self.split_batch(batch)
        out = self.bnn(*args, samples=self.samples, log_probs=self._tracker.log_probs, **kwargs)
        self._tracker.reset()
        loss = self._tracker(out, y)
        stats = self._tracker.means()
        n = len(y)
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log("train_nll", stats["nll"], prog_bar=True, batch_size=n)
        self.log("train_kl", stats["kl"], batch_size=n)
        return loss

    def _collect(self, stage: str, batch: Any) -> None:
        args, kwargs, y = self.split_batch(batch)
        out = self.bnn(*args, samples=self.eval_samples, **kwargs)
        store = self._eval.setdefault(stage, [])
        if self.loss_fn.likelihood == "categorical":
            store.append(torch.cat([predictive(out), y.unsqueeze(-1).to(torch.float32)], dim=-1).cpu())
        else:
            from ..loss import first_tensor

            self.log(f"{stage}_nll", self.loss_fn.nll(first_tensor(out), y), batch_size=len(y))

    def _report(self, stage: str) -> None:
        rows = self._eval.pop(stage, [])
        if not rows:
            return
        table = self._gathered(torch.cat(rows))
        # Every rank computes the same numbers from the same rows: the metrics of the whole
        # evaluation set (a mean over ranks of per-rank ECE / NLL would not be).
        for name, value in calibration(table[:, :-1], table[:, -1].long()).items():
            self.log(f"{stage}_{name}", value, rank_zero_only=True)

    def _gathered(self, table: Tensor) -> Tensor:
        """The rows of every rank (each rank's may differ in number), in rank order."""
        world = getattr(self.trainer, "world_size", 1) if self._trainer is not None else 1
        if world <= 1:
            return table
        device = self.device
        sizes = self.all_gather(torch.tensor([len(table)], device=device)).reshape(-1).tolist()
        padded = table.new_zeros((max(sizes), table.shape[1]))
        padded[:len(table)] = table
        every = self.all_gather(padded.to(device)).cpu()  # (world, max rows, columns)
        return torch.cat([every[r, :n] for r, n in enumerate(sizes)])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._collect("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._collect("test", batch)

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = param_groups(self.bnn, self.lr, self.spread_lr)
        extra = [p for p in self.loss_fn.parameters() if p.requires_grad]  # a learned noise_std
        if extra:
            params.append({"params": extra, "lr": self.spread_lr, "weight_decay": 0.0})
        return torch.optim.Adam(params)
