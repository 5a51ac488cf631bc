"""bf.predict: shapes, uncertainty identities, PointMass, batching, modes, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import bayesify as bf
from bayesify.predict import Prediction

N, D, C = 13, 4, 3


class Net(bf.VIModule):
    """Two VILinear layers; ``output`` picks the output structure."""

    def __init__(self, variational=None, output: str = "tensor", seq: bool = False) -> None:
        super().__init__()
        self.fc1 = bf.nn.VILinear(D, 8, variational=variational)
        self.fc2 = bf.nn.VILinear(8, C, variational=variational)
        self.output = output
        self.seq = seq

    def point(self, x: torch.Tensor) -> torch.Tensor:
        """The forward at the posterior means, computed by hand."""
        return F.linear(torch.tanh(F.linear(x, self.fc1.weight, self.fc1.bias)), self.fc2.weight, self.fc2.bias)

    def forward(self, x: torch.Tensor):
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.output == "dict":
            return {"hidden": x.sum(-1), "logits": out}
        if self.output == "tuple":
            return out, x
        return out


def wide() -> bf.variational.MeanFieldNormal:
    return bf.variational.MeanFieldNormal(init_std=0.5)


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net(wide())


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def gen(seed: int = 123) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- categorical --------------------------------------------------------------------------------------
def test_categorical_shapes_and_identities(net: Net, x: torch.Tensor) -> None:
    pred = bf.predict(net, x, samples=40, generator=gen())
    assert isinstance(pred, Prediction) and pred.likelihood == "categorical" and pred.samples == 40
    assert pred.probs.shape == (N, C)
    for name in ("entropy", "expected_entropy", "mutual_information"):
        assert getattr(pred, name).shape == (N,)
    assert pred.mean is None and pred.variance is None and pred.sample_probs is None
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(N))
    assert (pred.mutual_information >= 0).all()
    assert (pred.mutual_information > 1e-3).all()  # init_std=0.5 disagrees visibly
    torch.testing.assert_close(pred.entropy, pred.expected_entropy + pred.mutual_information, atol=1e-6, rtol=0)
    assert (pred.entropy <= torch.log(torch.tensor(float(C))) + 1e-6).all()
    assert not pred.probs.requires_grad


def test_categorical_matches_hand_computation(net: Net, x: torch.Tensor) -> None:
    pred = bf.predict(net, x, samples=25, generator=gen(), keep_samples=True)
    logits = net(x, samples=25, generator=gen())
    sp = torch.softmax(logits, -1).detach()
    torch.testing.assert_close(pred.sample_probs, sp)
    p = sp.mean(0)
    torch.testing.assert_close(pred.probs, p)
    torch.testing.assert_close(pred.entropy, -(p * p.log()).sum(-1))
    torch.testing.assert_close(pred.expected_entropy, -(sp * sp.log()).sum(-1).mean(0))


def test_pointmass_has_no_epistemic_uncertainty(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = Net(bf.variational.PointMass())
    pred = bf.predict(net, x, samples=8)
    torch.testing.assert_close(pred.mutual_information, torch.zeros(N), atol=1e-6, rtol=0)
    torch.testing.assert_close(pred.probs, torch.softmax(net.point(x), -1).detach())
    torch.testing.assert_close(pred.entropy, pred.expected_entropy, atol=1e-6, rtol=0)
    reg = bf.predict(net, x, samples=8, likelihood="normal")
    assert torch.equal(reg.epistemic_variance, torch.zeros(N, C))
    torch.testing.assert_close(reg.mean, net.point(x).detach())


@pytest.mark.parametrize("output", ["dict", "tuple"])
def test_structured_outputs_use_the_prediction_tensor(output: str, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain, structured = Net(wide()), Net(wide(), output=output)
    structured.load_state_dict(plain.state_dict())
    a = bf.predict(plain, x, samples=10, generator=gen())
    b = bf.predict(structured, x, samples=10, generator=gen())
    torch.testing.assert_close(a.probs, b.probs)


def test_extra_batch_dimensions(net: Net) -> None:
    x = torch.randn(5, 7, D)  # e.g. (batch, tokens, features)
    pred = bf.predict(net, x, samples=6, batch_size=2, keep_samples=True)
    assert pred.probs.shape == (5, 7, C) and pred.mutual_information.shape == (5, 7)
    assert pred.sample_probs.shape == (6, 5, 7, C)


def test_converted_model(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    point = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))
    pred = bf.predict(bf.bayesify(point, variational="pointmass"), x, samples=4, batch_size=5)
    torch.testing.assert_close(pred.probs, torch.softmax(point(x), -1).detach())
    torch.testing.assert_close(pred.mutual_information, torch.zeros(N), atol=1e-6, rtol=0)
    assert bf.predict(bf.bayesify(point), x, samples=4).probs.shape == (N, C)
    # chunk_size: fewer weight samples in memory at once, the same predictive on CPU
    bnn = bf.bayesify(point)
    whole = bf.predict(bnn, x, samples=9, generator=torch.Generator().manual_seed(2))
    chunked = bf.predict(bnn, x, samples=9, generator=torch.Generator().manual_seed(2), chunk_size=4)
    torch.testing.assert_close(whole.probs, chunked.probs)


# -- normal ---------------------------------------------------------------------------------------
def test_normal_variance_decomposition(net: Net, x: torch.Tensor) -> None:
    pred = bf.predict(net, x, samples=30, likelihood="normal", generator=gen(), noise_std=0.5, keep_samples=True)
    assert pred.likelihood == "normal" and pred.probs is None and pred.entropy is None
    for name in ("mean", "variance", "epistemic_variance", "aleatoric_variance"):
        assert getattr(pred, name).shape == (N, C)
    means = net(x, samples=30, generator=gen()).detach()
    torch.testing.assert_close(pred.sample_means, means)
    torch.testing.assert_close(pred.mean, means.mean(0))
    torch.testing.assert_close(pred.epistemic_variance, means.var(0, unbiased=False))
    torch.testing.assert_close(pred.aleatoric_variance, torch.full((N, C), 0.25))
    torch.testing.assert_close(pred.variance, pred.epistemic_variance + 0.25)
    assert (pred.epistemic_variance > 0).all()


def test_normal_noise_defaults_and_tensor_noise(net: Net, x: torch.Tensor) -> None:
    pred = bf.predict(net, x, samples=5, likelihood="gaussian")
    assert pred.likelihood == "normal"
    assert torch.equal(pred.aleatoric_variance, torch.zeros(N, C))
    torch.testing.assert_close(pred.variance, pred.epistemic_variance)
    per_output = torch.tensor([0.1, 0.2, 0.3])
    pred = bf.predict(net, x, samples=5, likelihood="normal", noise_std=per_output, batch_size=4)
    torch.testing.assert_close(pred.aleatoric_variance, per_output.square().expand(N, C))


# -- batching and randomness -----------------------------------------------------------------------
def test_dataloader_equals_tensor_path(net: Net, x: torch.Tensor) -> None:
    whole = bf.predict(net, x, samples=20, generator=gen())
    loader = DataLoader(TensorDataset(x, torch.zeros(N, dtype=torch.long)), batch_size=4)
    batched = bf.predict(net, loader, samples=20, generator=gen())
    by_size = bf.predict(net, x, samples=20, generator=gen(), batch_size=5)
    plain_list = bf.predict(net, list(x.split(6)), samples=20, generator=gen())
    dicts = bf.predict(net, [{"x": b, "labels": b[:, 0]} for b in x.split(3)], samples=20, generator=gen())
    for other in (batched, by_size, plain_list, dicts):
        for name in ("probs", "entropy", "expected_entropy", "mutual_information"):
            torch.testing.assert_close(getattr(other, name), getattr(whole, name))


def test_mapping_input_drops_labels(net: Net, x: torch.Tensor) -> None:
    a = bf.predict(net, {"x": x, "labels": torch.zeros(N)}, samples=5, generator=gen(), batch_size=4)
    b = bf.predict(net, x, samples=5, generator=gen())
    torch.testing.assert_close(a.probs, b.probs)


def test_generator_advances_as_one_call(net: Net, x: torch.Tensor) -> None:
    g1, g2 = gen(), gen()
    bf.predict(net, x, samples=5, generator=g1)
    bf.predict(net, x, samples=5, generator=g2, batch_size=2)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(g1.get_state(), gen().get_state())


def test_default_generator_follows_global_seed(net: Net, x: torch.Tensor) -> None:
    torch.manual_seed(7)
    a = bf.predict(net, x, samples=5, batch_size=4)
    torch.manual_seed(7)
    b = bf.predict(net, x, samples=5)
    c = bf.predict(net, x, samples=5)
    torch.testing.assert_close(a.probs, b.probs)
    assert not torch.allclose(b.probs, c.probs)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_in_forward_estimators(x: torch.Tensor, estimator: str) -> None:
    class Local(bf.VIModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = bf.nn.VILinear(D, 8, variational=wide(), estimator=estimator)
            self.fc2 = bf.nn.VILinear(8, C, variational=wide(), estimator=estimator)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    net = Local()
    a = bf.predict(net, x, samples=10, generator=gen())
    b = bf.predict(net, x, samples=10, generator=gen())
    torch.testing.assert_close(a.probs, b.probs)
    assert (a.mutual_information > 0).all()
    # Noise drawn per input: batching gives another (equally valid) draw, same shapes.
    assert bf.predict(net, x, samples=10, generator=gen(), batch_size=4).probs.shape == (N, C)


# -- model state ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_mode_restored(net: Net, x: torch.Tensor, mode: str) -> None:
    net.train(mode != "eval")
    if mode == "mixed":
        net.fc1.eval()
    before = {name: m.training for name, m in net.named_modules()}
    params = {k: v.clone() for k, v in net.state_dict().items()}
    bf.predict(net, x, samples=3)
    assert {name: m.training for name, m in net.named_modules()} == before
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k])


def test_runs_in_eval_mode_without_grad(x: torch.Tensor) -> None:
    seen = []

    class Probe(Net):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return super().forward(x)

    torch.manual_seed(0)
    net = Probe(wide()).train()
    bf.predict(net, x, samples=3)
    assert seen and all(s == (False, False) for s in seen)


def test_mode_restored_after_error(net: Net) -> None:
    net.train()
    with pytest.raises(RuntimeError):
        bf.predict(net, torch.randn(2, D + 1), samples=3)
    assert net.training and net.fc1.training


# -- progress --------------------------------------------------------------------------------------------
def test_silent_unless_progress(net: Net, x: torch.Tensor, capsys) -> None:
    bf.predict(net, x, samples=3, batch_size=4)
    assert capsys.readouterr() == ("", "")
    loader = DataLoader(TensorDataset(x), batch_size=4)
    bf.predict(net, loader, samples=3, progress=True)
    bf.predict(net, iter(x.split(4)), samples=3, progress=True)  # unknown length
    captured = capsys.readouterr()
    assert captured.out == "" and "predict" in captured.err


# -- input checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"samples": 0}, ValueError, "samples must be a positive int"),
    ({"samples": 2.5}, ValueError, "samples must be a positive int"),
    ({"samples": True}, ValueError, "samples must be a positive int"),
    ({"likelihood": "poisson"}, ValueError, "valid choices: categorical, gaussian, normal"),
    ({"likelihood": None}, ValueError, "valid choices"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ({"batch_size": 1.5}, ValueError, "batch_size must be a positive int"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ({"noise_std": 0.1}, ValueError, "noise_std applies only to likelihood='normal'"),
    ({"noise_std": -1.0, "likelihood": "normal"}, ValueError, "non-negative"),
    ({"noise_std": "0.1", "likelihood": "normal"}, TypeError, "noise_std must be a positive number"),
    ({"noise_std": torch.ones(5), "likelihood": "normal"}, ValueError, "does not broadcast"),
])
def test_argument_checks(net: Net, x: torch.Tensor, kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        bf.predict(net, x, **kwargs)


def test_input_checks(net: Net, x: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="expects a bayesify.VIModule"):
        bf.predict(torch.nn.Linear(D, C), x)
    with pytest.raises(TypeError, match="x must be a tensor, a mapping"):
        bf.predict(net, "not data")
    with pytest.raises(TypeError, match="x must be a tensor, a mapping"):
        bf.predict(net, 3.0)
    with pytest.raises(TypeError, match="batch 1 must be a tensor"):
        bf.predict(net, [x, "oops"], samples=2)
    with pytest.raises(ValueError, match="already batched"):
        bf.predict(net, DataLoader(TensorDataset(x), batch_size=4), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        bf.predict(net, [], samples=2)
    with pytest.raises(ValueError, match="batch 0 is an empty tuple"):
        bf.predict(net, [()], samples=2)


def test_prediction_repr(net: Net, x: torch.Tensor) -> None:
    text = repr(bf.predict(net, x, samples=2))
    assert text.startswith("Prediction(likelihood='categorical', samples=2, probs=<(13, 3)>")
    assert "mean=" not in text


def test_exported() -> None:
    from bayesify.predict import predict

    assert bf.predict is predict and bf.Prediction is Prediction
