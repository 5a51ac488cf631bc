"""Train a converted Hugging Face model with ``transformers.Trainer``: :class:`BayesianTrainer`.

``BayesianTrainer`` is a ``Trainer`` whose training loss is the negative ELBO of ``samples``
weight samples (``bf.ELBOLoss``, the KL divided by the training set's size), which logs the
NLL and the KL next to the loss, puts the variational spreads in their own optimizer group,
and evaluates the predictive distribution (``eval_samples`` samples) with calibration
metrics: ``eval_accuracy``, ``eval_nll``, ``eval_ece``, ``eval_brier`` (``eval_loss`` is the
predictive NLL). Everything else is the ``Trainer`` you know (``TrainingArguments``, data
collators, callbacks, ``trainer.state.log_history``).

Example::

    >>> from bayesify.integrations.hf import BayesianTrainer
    >>> bnn = bf.bayesify(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
    ...                   include=["bert.encoder.layer.5.*", "bert.pooler.*", "classifier"])
    >>> trainer = BayesianTrainer(model=bnn, args=TrainingArguments("out", learning_rate=1e-3),
    ...                           train_dataset=train, eval_dataset=test, samples=4)
    >>> trainer.train(); trainer.evaluate()   # {'eval_loss': ..., 'eval_accuracy': ..., 'eval_ece': ...}

Saving (``trainer.save_model(dir)``, checkpoints) also writes ``dir/model.bnn`` with
:func:`bayesify.save`, which ``bf.load`` reads back.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from ..io import save as bf_save
from ..loss import ELBOLoss, first_tensor
from ._common import ELBOTracker, calibration, check_model, dataset_length, param_groups, predictive

__all__ = ["BayesianTrainer", "calibration_metrics", "BNN_FILE"]

#: The file ``BayesianTrainer`` writes next to the Trainer's own checkpoint files.
BNN_FILE = "model.bnn"


def calibration_metrics(eval_pred: transformers.EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` for :class:`BayesianTrainer`: its predictions are log predictive
    probabilities; returns accuracy, NLL, ECE (15 bins) and Brier score."""
    preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    probs = torch.as_tensor(preds).float().exp()
    return calibration(probs, torch.as_tensor(eval_pred.label_ids))


def _inner(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a converted model (and inside a PEFT wrapper)."""
    inner = getattr(model, "model", model)
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


class BayesianTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for a converted model (``bf.bayesify(hf_model)``).

    Args (on top of ``Trainer``'s):
        samples: weight samples per training step (one vectorised call).
        eval_samples: weight samples per evaluation batch.
        dataset_size: the number of training points (divides the KL); default
            ``len(train_dataset)``.
        kl_weight: multiplies the KL term (1.0 is the ELBO).
        loss_fn: a ``bf.ELBOLoss`` to use instead (then ``dataset_size`` / ``kl_weight`` are
            its own); evaluation with calibration metrics needs its likelihood ``"categorical"``.
        spread_lr: learning rate of the variational spreads (``*_rho``); the means use
            ``args.learning_rate``. Default 1e-2 (a spread lives on a log scale).

    Every batch must hold ``labels`` (class indices for the categorical likelihood).
    Logged at each ``logging_steps``: ``loss`` (negative ELBO), ``nll`` and ``kl``
    (KL(q || prior) in nats, before division by ``dataset_size``), averaged since the last log.
    """

    def __init__(self, *args: Any, samples: int = 4, eval_samples: int = 20, dataset_size: int | None = None,
                 kl_weight: float = 1.0, loss_fn: ELBOLoss | None = None, spread_lr: float = 1e-2,
                 **kwargs: Any) -> None:
        from ..module import check_samples

        model = kwargs.get("model", args[0] if args else None)
        check_model(model, "BayesianTrainer")
        self.samples = check_samples(samples)
        self.eval_samples = check_samples(eval_samples)
        if loss_fn is not None and not isinstance(loss_fn, ELBOLoss):
            raise TypeError(f"loss_fn must be a bf.ELBOLoss, got {type(loss_fn).__name__}")
        if isinstance(spread_lr, bool) or not isinstance(spread_lr, (int, float)) or spread_lr <= 0:
            raise ValueError(f"spread_lr must be a positive number, got {spread_lr!r}")
        self.spread_lr = float(spread_lr)
        self._loss_settings = (dataset_size, kl_weight)
        if kwargs.get("compute_metrics") is None and (loss_fn is None or loss_fn.likelihood == "categorical"):
            kwargs["compute_metrics"] = calibration_metrics
        super().__init__(*args, **kwargs)
        if not self.label_names:  # the converted model's forward(*args, **kwargs) names no labels
            self.label_names = ["labels"]
        # Our loss is a per-batch mean: the Trainer divides it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._tracker = ELBOTracker(loss_fn) if loss_fn is not None else None
        if self._tracker is None and self.train_dataset is not None:
            self._tracker = self._make_tracker()

    # -- loss ---------------------------------------------------------------------------------------
    def _make_tracker(self) -> ELBOTracker:
        dataset_size, kl_weight = self._loss_settings
        n = dataset_length(self.train_dataset, dataset_size, "BayesianTrainer")
        return ELBOTracker(ELBOLoss("categorical", dataset_size=n, kl_weight=kl_weight))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs.pop("label", None)
        if labels is None:
            raise ValueError(f"BayesianTrainer needs 'labels' in every batch, got keys {sorted(inputs)}")
        if model.training:
            if self._tracker is None:
                self._tracker = self._make_tracker()
            self._tracker.loss_fn.to(labels.device)
            out = model(**inputs, samples=self.samples, log_probs=self._tracker.log_probs)
            loss = self._tracker(out, labels)
            return (loss, out) if return_outputs else loss
        out = model(**inputs, samples=self.eval_samples)
        likelihood = self._tracker.loss_fn.likelihood if self._tracker is not None else "categorical"
        if likelihood == "categorical":
            probs = predictive(out)
            loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels)
            outputs = {"logits": probs.clamp_min(1e-12).log()}  # log predictive probabilities
        else:
            pred = first_tensor(out)
            loss = self._tracker.loss_fn.nll(pred, labels)
            outputs = {"logits": pred.mean(0)}  # the predictive mean
        return (loss, outputs) if return_outputs else loss

    # -- logging ------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._tracker is not None:
            logs.update(self._tracker.means())
            self._tracker.reset()
        super().log(logs, *args, **kwargs)

    # -- optimizer ----------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (``args.optim``) with the spreads in a group at ``spread_lr``, and
        the loss's parameters (a learned noise) in another at ``spread_lr``."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            opt_model = self.model if model is None else model
            cls, opt_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if "params" not in opt_kwargs and isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
                groups = param_groups(opt_model, self.args.learning_rate, self.spread_lr, self.args.weight_decay)
                loss_fn = self._tracker.loss_fn if self._tracker is not None else None
                extra = [p for p in loss_fn.parameters() if p.requires_grad] if loss_fn is not None else []
                if extra:  # the loss's own parameters (the learned noise of "normal"), at the spreads' rate
                    groups.append({"params": extra, "lr": self.spread_lr, "weight_decay": 0.0})
                self.optimizer = cls(groups, **opt_kwargs)
                return self.optimizer
        return super().create_optimizer(model)

    # -- data and saving ----------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        # The converted model's forward is (*args, **kwargs): keep the columns the wrapped model takes.
        if self._signature_columns is None:
            params = inspect.signature(_inner(self.model).forward).parameters
            self._signature_columns = [*params, "label", "label_ids", *self.label_names]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            path = os.path.join(output_dir if output_dir is not None else self.args.output_dir, BNN_FILE)
            try:
                bf_save(self.accelerator.unwrap_model(self.model), path)
            except (ValueError, TypeError) as exc:
                warnings.warn(f"BayesianTrainer: wrote the Trainer's checkpoint but not {path}: {exc}",
                              UserWarning, stacklevel=2)
