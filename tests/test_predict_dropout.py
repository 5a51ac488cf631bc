"""``bf.predict(..., dropout=True)``: the model's own dropout layers as part of the posterior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesify as bf

D, H, C, N = 5, 64, 3, 12


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dropout_net(p: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Dropout(p), nn.Linear(H, C)).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(N, D, generator=gen(1))


def test_masks_differ_per_sample_and_are_bernoulli(x: torch.Tensor) -> None:
    # A network that is just the dropout of a fixed hidden layer: every sampled output is
    # h * mask / (1 - p) with a 0/1 mask, a mask of its own per sample.
    torch.manual_seed(0)
    lin = nn.Linear(D, H)
    bnn = bf.bayesify(nn.Sequential(lin, nn.Dropout(0.5)).eval(), variational="pointmass")
    pred = bf.predict(bnn, x, samples=40, likelihood="normal", keep_samples=True, dropout=True, generator=gen())
    s = pred.sample_means  # (40, N, H)
    with torch.no_grad():
        h = lin(x)
    kept = s != 0
    torch.testing.assert_close(s[kept], (2 * h).expand_as(s)[kept])
    assert 0.4 < kept.float().mean() < 0.6
    masks = kept.reshape(40, -1)
    assert len({tuple(m.tolist()) for m in masks}) == 40  # no two samples share their masks
    # Without dropout=True: eval mode, every sample the point model's output.
    off = bf.predict(bnn, x, samples=4, likelihood="normal", keep_samples=True, generator=gen())
    torch.testing.assert_close(off.sample_means, h.expand(4, *h.shape))


def test_meanfield_samples_draw_their_own_masks(x: torch.Tensor) -> None:
    bnn = bf.bayesify(dropout_net(), variational=bf.variational.MeanFieldNormal(init_std=1e-3))
    a = bf.predict(bnn, x, samples=30, keep_samples=True, generator=gen())
    b = bf.predict(bnn, x, samples=30, keep_samples=True, dropout=True, generator=gen())
    # The tiny weight spread alone barely moves the outputs; dropout moves them a lot.
    assert b.mutual_information.mean() > 20 * a.mutual_information.mean()
    assert not torch.equal(b.sample_probs[0], b.sample_probs[1])


def test_pointmass_with_dropout_is_mc_dropout(x: torch.Tensor) -> None:
    """The predictive of a PointMass model with dropout=True is MC dropout's (statistically: the
    vmapped masks are not drawn in the per-pass loop's order)."""
    net = dropout_net()
    bnn = bf.bayesify(net, variational="pointmass")
    S = 4000
    pred = bf.predict(bnn, x, samples=S, keep_samples=True, dropout=True, generator=gen())
    torch.manual_seed(3)
    net.train()
    with torch.no_grad():
        mc = torch.stack([net(x).softmax(-1) for _ in range(S)])
    net.eval()
    # Per input and class: the two Monte Carlo means agree within 5 standard errors.
    se = (pred.sample_probs.var(0) / S + mc.var(0) / S).sqrt()
    assert ((pred.probs - mc.mean(0)).abs() <= 5 * se + 1e-6).all()
    # ... and so do the spreads of the per-sample probabilities.
    ratio = pred.sample_probs.std(0) / mc.std(0)
    assert ((ratio > 0.9) & (ratio < 1.1)).all()


def test_reproducible_with_generator_and_default_unchanged(x: torch.Tensor) -> None:
    bnn = bf.bayesify(dropout_net())
    a = bf.predict(bnn, x, samples=8, dropout=True, generator=gen(5))
    b = bf.predict(bnn, x, samples=8, dropout=True, generator=gen(5))
    c = bf.predict(bnn, x, samples=8, dropout=True, generator=gen(6))
    assert torch.equal(a.probs, b.probs)
    assert not torch.allclose(a.probs, c.probs)
    # The default is the eval-mode predictive: dropout=False equals not passing it, bit for bit.
    d = bf.predict(bnn, x, samples=8, generator=gen(5))
    e = bf.predict(bnn, x, samples=8, dropout=False, generator=gen(5))
    assert torch.equal(d.probs, e.probs)
    assert not torch.allclose(a.probs, d.probs)
    # The generator advances as by one call, as without dropout.
    g1, g2 = gen(5), gen(5)
    bf.predict(bnn, x, samples=8, dropout=True, generator=g1, batch_size=4)
    bf.predict(bnn, x, samples=8, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_batches_get_independent_masks() -> None:
    """The generator is rewound per batch (the same weight samples), but the masks are not
    repeated: two identical batches get different dropout draws."""
    bnn = bf.bayesify(dropout_net(), variational="pointmass")
    half = torch.randn(4, D, generator=gen(2))
    x = torch.cat([half, half])
    pred = bf.predict(bnn, x, samples=6, batch_size=4, keep_samples=True, dropout=True, generator=gen())
    assert not torch.equal(pred.sample_probs[:, :4], pred.sample_probs[:, 4:])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_modes_restored_and_batchnorm_kept_in_eval(x: torch.Tensor, mode: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H), nn.ReLU(), nn.Dropout(0.3), nn.Linear(H, C))
    bnn = bf.bayesify(net.eval(), variational="pointmass").train(mode == "train")
    before = [m.training for m in bnn.modules()]
    stats = bnn.model[1].running_mean.clone()
    bf.predict(bnn, x, samples=5, dropout=True, generator=gen())
    assert [m.training for m in bnn.modules()] == before
    assert torch.equal(bnn.model[1].running_mean, stats)  # BatchNorm ran in eval mode


def test_hugging_face_hidden_dropout(x: torch.Tensor) -> None:
    """A real (config-built) Hugging Face BERT: its nn.Dropout layers give spread to a PointMass model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=C, hidden_dropout_prob=0.2)
    bnn = bf.bayesify(transformers.BertForSequenceClassification(cfg).eval(), variational="pointmass")
    ids = {"input_ids": torch.randint(0, 50, (3, 7), generator=gen())}
    off = bf.predict(bnn, ids, samples=4, keep_samples=True, generator=gen()).sample_probs
    on = bf.predict(bnn, ids, samples=4, keep_samples=True, dropout=True, generator=gen()).sample_probs
    assert torch.equal(off[0], off[1])
    assert (on.std(0).amax(-1) > 1e-4).all()  # every input's probabilities move from sample to sample


def test_bad_input(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain = bf.bayesify(nn.Sequential(nn.Linear(D, C), nn.Dropout(0.0)))
    with pytest.raises(ValueError, match="no dropout layer with p > 0"):
        bf.predict(plain, x, samples=2, dropout=True)
    bnn = bf.bayesify(dropout_net())
    before = [m.training for m in bnn.modules()]
    with pytest.raises(TypeError, match="dropout must be True or False"):
        bf.predict(bnn, x, samples=2, dropout=1)
    with pytest.raises(ValueError, match="dropout=True needs the sampled predictive"):
        bf.predict(bnn, x, samples=2, dropout=True, linearized=True)
    assert [m.training for m in bnn.modules()] == before
    # A recorded linearised predictive (bf.laplace / bf.calibrate) is named in the error.
    bnn.predictive = {"linearized": True}
    with pytest.raises(ValueError, match="recorded by bf.laplace"):
        bf.predict(bnn, x, samples=2, dropout=True)
    assert bf.predict(bnn, x, samples=2, dropout=True, linearized=False).probs.shape == (N, C)
