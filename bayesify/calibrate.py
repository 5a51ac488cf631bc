"""Calibration on held-out data: a posterior temperature and a softmax temperature.

``bf.calibrate(bnn, val_loader)`` chooses, by the predictive negative log likelihood on
held-out data,

- a **posterior scale** ``c``: every spread (standard deviation) is multiplied by ``c``
  (the posterior temperature is ``c ** 2``, the factor on the variances); ``c = 0`` (the
  point model) is among the candidates, so a calibrated model is never worse on the
  validation NLL than its means; optionally one ``c`` per module group (``groups=``,
  chosen group by group, two rounds);
- for classification, a **softmax temperature** ``T`` dividing the logits of every sample.

With the linearised predictive (``linearized=True``, the default after ``bf.laplace``) the
candidate scales are vectorised: the outputs are ``f + c J delta`` for the same drawn
``delta``, so one forward-mode pass per group serves the whole grid; the sampled predictive
runs the network once per candidate scale (the same noise for every candidate). The
softmax temperatures are always vectorised.

The spreads are rescaled in place, and the choices are recorded in ``bnn.predictive``
(``{"posterior_scale", "softmax_temperature", "linearized"}``), which ``bf.predict`` uses
by default and ``bf.save`` / ``bf.load`` keep. Works after any fitting route (ELBO,
natural gradient, Laplace).

Example::

    >>> bf.laplace(bnn, train_loader)
    >>> cal = bf.calibrate(bnn, val_loader)
    >>> cal.posterior_scale, cal.softmax_temperature, cal.nll
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _backprop_ggn as _bp
from ._choices import lookup
from ._linearize import at_means, linearized_outputs, mean_output, perturbations, site_means, spread_sites
from .laplace import NO_SPREAD, _iterate, _module_name, _split, _to
from .loss import LIKELIHOODS, first_tensor
from .module import VIModule
from .sites import Site, iter_sites
from .variational import MeanFieldNormal, inverse_softplus

__all__ = ["calibrate", "Calibration", "DEFAULT_SCALES", "DEFAULT_TEMPERATURES"]

#: Candidate posterior scales (0 = the point model), and softmax temperatures.
DEFAULT_SCALES = (0.0, *[float(v) for v in torch.logspace(-2, 2, 41, dtype=torch.float64)])
DEFAULT_TEMPERATURES = tuple(float(v) for v in torch.logspace(math.log10(0.25), math.log10(4), 33,
                                                              dtype=torch.float64))


@dataclass
class Calibration:
    """What :func:`calibrate` chose: ``posterior_scale`` per group (``"all"`` without groups),
    ``softmax_temperature``, and the validation NLL before (``nll_before``, at scale 1 and
    temperature 1) and after (``nll``)."""

    posterior_scale: dict[str, float]
    softmax_temperature: float
    nll: float
    nll_before: float
    linearized: bool
    n_examples: int
    grid: dict[str, Any] = field(default_factory=dict, repr=False)
    #: How the predictive was drawn: "covariance", "jvp" (linearised) or "sampled".
    method: str = ""


def _check_grid(values: Any, name: str, allow_zero: bool) -> Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or (
            not allow_zero and bool((t == 0).any())):
        raise ValueError(f"{name} must be non-empty, finite and {'>= 0' if allow_zero else '> 0'}, got {values!r}")
    return t


def _groups(bnn: VIModule, sites: list[Site], groups: Any) -> dict[str, list[Site]]:
    if groups is None:
        return {"all": sites}
    if not isinstance(groups, dict) or not all(isinstance(k, str) for k in groups):
        raise TypeError(f"groups must be a dict {{name: module glob or list of globs}}, got {groups!r}")
    out: dict[str, list[Site]] = {}
    taken: set[str] = set()
    for name, pats in groups.items():
        pats = [pats] if isinstance(pats, str) else list(pats)
        chosen = [s for s in sites if s.qualname not in taken and any(
            fnmatch.fnmatchcase(p, pat) for pat in pats
            for p in _prefixes(_module_name(bnn, s)))]
        if not chosen:
            raise ValueError(f"group {name!r} ({pats}) matched no Bayesian module")
        taken.update(s.qualname for s in chosen)
        out[name] = chosen
    rest = [s for s in sites if s.qualname not in taken]
    if rest:
        out["rest"] = rest
    return out


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]


def _nll_categorical(logits: Tensor, y: Tensor, temps: Tensor) -> Tensor:
    """Summed NLL of the sample-averaged softmax: ``logits`` ``(K, S, N, C)``, ``temps`` ``(M,)``
    -> ``(M, K)``."""
    out = []
    for t in temps:  # one temperature at a time bounds memory at K*S*N*C
        z = logits / t
        idx = y.reshape(1, 1, -1, 1).expand(*z.shape[:3], 1)
        # log p_y = z_y - logsumexp(z): ~4x faster than log_softmax over a short class dimension on CPU
        ly = z.gather(-1, idx).squeeze(-1) - torch.logsumexp(z, -1)  # (K, S, N)
        out.append(-(torch.logsumexp(ly, 1) - math.log(ly.shape[1])).sum(-1))
    return torch.stack(out)


def _nll_normal(means: Tensor, y: Tensor, noise_var: float) -> Tensor:
    """Summed Gaussian NLL of the moment-matched predictive: ``means`` ``(K, S, N, ...)`` -> ``(1, K)``."""
    mu = means.mean(1)
    var = means.var(1, correction=0) + noise_var
    y = y.reshape(mu.shape[1:]).to(mu.dtype)
    nll = 0.5 * (torch.log(2 * math.pi * var) + (y - mu).square() / var)
    return nll.reshape(nll.shape[0], -1).sum(-1).unsqueeze(0)


def calibrate(
    bnn: VIModule,
    val_data: Any,
    likelihood: str = "categorical",
    *,
    samples: int = 32,
    linearized: bool | None = None,
    posterior: bool = True,
    softmax: bool = False,
    groups: dict[str, Any] | None = None,
    scales: Any = DEFAULT_SCALES,
    temperatures: Any = DEFAULT_TEMPERATURES,
    noise_std: float | None = None,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> Calibration:
    """Choose a posterior scale (and a softmax temperature) by NLL on ``val_data``; in place.

    Args:
        bnn: a Bayesian model with a ``MeanFieldNormal`` posterior (any fitting route).
        val_data: held-out batches with labels: a DataLoader of ``(x, y)``, one ``(x, y)`` tuple,
            or mappings with a ``labels`` entry (Hugging Face).
        likelihood: ``"categorical"`` or ``"normal"`` (then ``noise_std`` is the observation noise).
        samples: posterior samples per candidate (the same draws for every candidate).
        linearized: use the linearised predictive (default: ``bnn.predictive["linearized"]``,
            which ``bf.laplace`` sets, else False); recorded for ``bf.predict``.
        posterior / softmax: calibrate the spreads / the softmax temperature (categorical only).
        groups: ``{name: module glob(s)}``: one scale per group (the unmatched sites form "rest").
        scales / temperatures: candidate values (defaults: ``DEFAULT_SCALES``, ``DEFAULT_TEMPERATURES``).
        generator: for the posterior draws.
        method: how the linearised predictive's outputs ``f + J delta`` are drawn: ``"jvp"`` (forward-mode
            AD of ``samples`` weight draws, as ``bf.predict(..., linearized=True)``), ``"covariance"``
            (the per-example output covariance ``J diag(var) J^T`` from one backward of the outputs,
            then ``samples`` draws in output space: the same distribution, cheaper when there are
            fewer outputs per example than samples; diagonal spreads, at most 64 outputs per example),
            or ``"auto"`` (default): covariance where it applies, else jvp. Recorded in ``Calibration.method``.
    """
    if not isinstance(bnn, VIModule):
        raise TypeError(f"calibrate expects a bayesify model (bf.bayesify(model)), got {type(bnn).__name__}")
    kind = lookup("likelihood", likelihood, LIKELIHOODS)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    for name, val in (("posterior", posterior), ("softmax", softmax)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be True or False, got {val!r}")
    route = lookup("method", method, {"auto": "auto", "jvp": "jvp", "covariance": "covariance", "cov": "covariance"})
    if linearized is not None and not isinstance(linearized, bool):
        raise TypeError(f"linearized must be True, False or None, got {linearized!r}")
    record = dict(getattr(bnn, "predictive", None) or {})
    lin = bool(record.get("linearized", False)) if linearized is None else linearized
    grid_c = _check_grid(scales, "scales", True) if posterior else torch.ones(1, dtype=torch.float64)
    grid_t = (_check_grid(temperatures, "temperatures", False) if softmax and kind == "categorical"
              else torch.ones(1, dtype=torch.float64))
    if kind == "categorical" and noise_std is not None:
        raise ValueError("noise_std applies only to likelihood='normal'")
    noise_var = 0.0 if noise_std is None else float(noise_std) ** 2
    if kind == "normal" and noise_var <= 0:
        raise ValueError("likelihood='normal' needs noise_std= (the observation noise, e.g. LaplaceResult.noise_std)")
    sites = list(iter_sites(bnn))
    if not sites:
        raise ValueError("the model has no Bayesian sites; convert it with bf.bayesify(model) first")
    if posterior:
        for s in sites:
            if type(s.spec.variational) is not MeanFieldNormal:
                raise ValueError(f"calibrate rescales MeanFieldNormal spreads; site {s.qualname} has "
                                 f"{s.spec.variational!r}; pass posterior=False to calibrate the softmax only")
    by_group = _groups(bnn, sites, groups)
    device = sites[0].mean.device
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(
        int(torch.randint(0, 2**62, (1,))))
    modes = [(m, m.training) for m in bnn.modules()]
    bnn.eval()
    try:
        with torch.no_grad():
            data = _load(bnn, val_data)
            evaluate = (_Linear(bnn, data, by_group, samples, gen, route) if lin
                        else _Sampled(bnn, data, by_group if posterior else {}, samples, gen))
            nll_of = (lambda out, y: _nll_categorical(out, y, grid_t)) if kind == "categorical" else (
                lambda out, y: _nll_normal(out, y, noise_var))
            n = sum(int(y.shape[0]) for *_, y in data)
            if n == 0:
                raise ValueError("val_data holds no examples: calibrate needs held-out (x, y) data")
            chosen = {g: 1.0 for g in by_group}
            nll_before = float(evaluate.nll(chosen, None, None, nll_of)[0 if kind == "normal" else
                                                                         int((grid_t - 1).abs().argmin())])
            best_t = 1.0
            table: dict[str, Tensor] = {}
            rounds = 2 if len(by_group) > 1 else 1
            best = nll_before
            for _ in range(rounds if posterior else 1):
                for g in (by_group if posterior else ["all"]):
                    tab = evaluate.nll(chosen, g if posterior else None, grid_c if posterior else None, nll_of)
                    tab = tab.reshape(len(grid_t), -1)
                    i_t, i_c = divmod(int(tab.argmin()), tab.shape[1])
                    if float(tab[i_t, i_c]) <= best:
                        best = float(tab[i_t, i_c])
                        best_t = float(grid_t[i_t])
                        if posterior:
                            chosen[g] = float(grid_c[i_c])
                    table[g] = tab
            if posterior:
                factors = getattr(bnn, "posterior_factors", None) or {}
                for g, group_sites in by_group.items():
                    _scale_spreads(group_sites, chosen[g])
                    for s in group_sites:
                        if s.qualname in factors:
                            factors[s.qualname] = factors[s.qualname] * chosen[g]
    finally:
        for m, mode in modes:
            m.training = mode
    prev = record.get("posterior_scale", {})
    record["posterior_scale"] = {g: chosen[g] * (prev.get(g, 1.0) if isinstance(prev, dict) else 1.0)
                                 for g in chosen}
    if kind == "categorical":
        record["softmax_temperature"] = best_t
    record["linearized"] = lin
    bnn.predictive = record
    return Calibration(posterior_scale=chosen, softmax_temperature=best_t, nll=best / n, nll_before=nll_before / n,
                       linearized=lin, n_examples=n, grid={"scales": grid_c, "temperatures": grid_t, "nll": table},
                       method=getattr(evaluate, "method", "sampled"))


def select_prior_precision(bnn: VIModule, result: Any, val_data: Any, candidates: Any,
                           generator: torch.Generator | None, samples: int = 16) -> float:
    """Set the spreads of ``result`` (a ``LaplaceResult``) for the candidate prior precision with the
    lowest NLL of the linearised predictive on ``val_data`` (the same draws for every candidate)."""
    from .laplace import apply

    kind = result.likelihood
    noise_var = (result.noise_std or 1.0) ** 2
    data = _load(bnn, val_data)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else None))
    scores = []
    route = "auto"
    modes = [(m, m.training) for m in bnn.modules()]
    bnn.eval()
    try:
        with torch.no_grad():
            for d in candidates:
                apply(bnn, result, float(d))
                sites = list(iter_sites(bnn))
                ev = _Linear(bnn, data, {"all": sites}, samples,
                             torch.Generator(device=sites[0].mean.device).manual_seed(seed), route)
                route = ev.method  # checked on the first candidate; the same route for the others
                nll = ev.nll({"all": 1.0}, None, None, (lambda o, y: _nll_categorical(o, y, torch.ones(1)))
                             if kind == "categorical" else (lambda o, y: _nll_normal(o, y, noise_var)))
                scores.append(float(nll.min()))
    finally:
        for m, mode in modes:
            m.training = mode
    best = float(candidates[min(range(len(scores)), key=scores.__getitem__)])
    apply(bnn, result, best)
    return best


def _check_covariance(bnn: VIModule, live: dict[str, list[Site]], var: dict[str, Tensor], args: tuple, kwargs: dict,
                      bsz: int, covs: dict[str, Tensor]) -> None:
    """On the first two examples, for a random output direction ``v``: the covariance route's
    ``v^T Sigma v`` equals ``sum_w var_w (d v.f / d w)^2`` from plain autograd, example by example."""
    leaves, spec = tree_flatten((args, kwargs))
    batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == bsz for t in leaves]
    k = next(iter(covs.values())).shape[-1]
    gen = torch.Generator(device=next(iter(covs.values())).device).manual_seed(0)
    for i in range(min(2, bsz)):
        a, kw = tree_unflatten([t[i:i + 1] if b else t for t, b in zip(leaves, batched)], spec)
        v = torch.randn(k, generator=gen, dtype=torch.float64, device=gen.device)
        refs = {g: _bp.autograd_output_covariance(bnn, ss, var, a, kw, v) for g, ss in live.items()}
        top = max(refs.values())
        for g, ref in refs.items():
            got = float(v @ covs[g][i].double() @ v)
            if not math.isclose(got, ref, rel_tol=1e-3, abs_tol=1e-6 * top + 1e-30):
                raise _bp.Unsupported("its output covariance differs from autograd's on the first examples")


def _load(bnn: VIModule, val_data: Any) -> list:
    device = next(iter(iter_sites(bnn))).mean.device
    batches, _ = _iterate(val_data)
    data = []
    for i, batch in enumerate(batches):
        args, kwargs, y = _split(batch, f"val batch {i}")
        if y is None:
            raise ValueError(f"val batch {i} has no labels; expected (x, y) batches or a 'labels' entry")
        data.append((tuple(_to(a, device) for a in args), {k: _to(v, device) for k, v in kwargs.items()},
                     _to(y, device)))
    if not data:
        raise ValueError("val_data yielded no batches")
    return data


@torch.no_grad()
def _scale_spreads(sites: list[Site], c: float) -> None:
    for s in sites:
        rho = getattr(s.module, f"{s.name}_rho")
        std = torch.nn.functional.softplus(rho.double()) * c
        rho.copy_(inverse_softplus(std.clamp_min(NO_SPREAD)).to(rho.dtype))


class _Linear:
    """Linearised predictive: per batch the outputs at the means and ``J delta_s`` per group, kept,
    so that any combination of group scales is ``f + sum_g c_g J delta_g`` (no network call).

    ``J delta_s`` comes either from forward-mode AD of the drawn ``delta_s`` (``"jvp"``: ``samples``
    tangents through the network), or (``"covariance"``, diagonal posteriors, at most
    ``MAX_COV_OUTPUTS`` outputs per example) as ``L z_s`` with ``L L^T = J diag(var) J^T``, the
    per-example covariance of the linearised outputs from one backward of the ``K`` output
    directions (``bayesify._backprop_ggn``): the same distribution of outputs, ``K`` backward
    directions instead of ``samples`` forward ones. ``"auto"``: covariance where it applies
    (checked against plain autograd on two examples of the first batch), else jvp."""

    def __init__(self, bnn: VIModule, data: list, by_group: dict[str, list[Site]], samples: int,
                 gen: torch.Generator, method: str = "auto") -> None:
        self.cache = []
        factors = getattr(bnn, "posterior_factors", None)
        by_group = {g: spread_sites(ss, factors) for g, ss in by_group.items()}
        live = {g: ss for g, ss in by_group.items() if ss}
        if method != "jvp" and live and not any(s.qualname in (factors or {}) for ss in live.values() for s in ss):
            try:
                self._by_covariance(bnn, data, live, samples, gen, check=method == "auto")
                self.method = "covariance"
                return
            except _bp.Unsupported as exc:
                if method == "covariance":
                    raise ValueError(f"calibrate(method='covariance') does not apply to this model: {exc}; "
                                     "use method='auto'") from None
                self.cache = []
        elif method == "covariance":
            raise ValueError("calibrate(method='covariance') needs diagonal spreads (no 'full' Laplace factors); "
                             "use method='auto'")
        self.method = "jvp"
        tangents = {g: perturbations(ss, samples, gen, factors) for g, ss in live.items()}
        for args, kwargs, y in data:
            primal, jts = None, {}
            for g in tangents:
                primal, jts[g] = linearized_outputs(bnn, args, kwargs, site_means(bnn, by_group[g]), tangents[g])
            if primal is None:  # no site has a spread: the outputs at the means
                with at_means(bnn):
                    primal = mean_output(bnn, {}, args, kwargs)
            self.cache.append((primal.detach(), {g: j.detach() for g, j in jts.items()}, y))

    def _by_covariance(self, bnn: VIModule, data: list, live: dict[str, list[Site]], samples: int,
                       gen: torch.Generator, check: bool) -> None:
        var = {}
        for ss in live.values():
            for s in ss:
                try:
                    std = s.spec.variational.std(s.mean.detach(), {k: v.detach() for k, v in s.vparams().items()})
                except ValueError as exc:
                    raise _bp.Unsupported(f"{s.qualname} has no elementwise std ({exc})") from None
                var[s.qualname] = std.square()
        z: dict[str, Tensor] = {}
        for i, (args, kwargs, y) in enumerate(data):
            bsz = next((t.shape[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.dim()),
                       None)
            if bsz is None:
                raise _bp.Unsupported("a batch without a batch dimension")
            with at_means(bnn):
                primal, covs = _bp.output_covariance(bnn, live, var, args, kwargs, bsz)
                if check and i == 0:
                    _check_covariance(bnn, live, var, args, kwargs, bsz, covs)
            k = primal[0].numel()
            if not z:  # one set of draws for every batch, as the jvp route's tangents
                z = {g: torch.randn(samples, k, generator=gen, dtype=primal.dtype, device=primal.device) for g in live}
            jts = {}
            for g, cov in covs.items():
                e, v = torch.linalg.eigh(cov.double())
                root = (v * e.clamp_min(0).sqrt().unsqueeze(-2)).to(primal.dtype)  # root root^T = cov
                jts[g] = torch.einsum("bkl,sl->sbk", root, z[g]).reshape(samples, *primal.shape)
            self.cache.append((primal, jts, y))

    def nll(self, chosen: dict[str, float], group: str | None, grid: Tensor | None, nll_of: Any) -> Tensor:
        total = 0
        for primal, jts, y in self.cache:
            fixed = primal.unsqueeze(0) + sum(c * jts[g] for g, c in chosen.items() if g != group and g in jts)
            if fixed.dim() == primal.dim():  # nothing moves: one "sample"
                fixed = fixed.unsqueeze(0)
            if group is None:
                out = fixed.unsqueeze(0)
            elif group not in jts:
                out = fixed.unsqueeze(0).expand(len(grid), *fixed.shape)
            else:
                c = grid.to(primal.dtype).reshape(-1, *([1] * jts[group].dim()))
                out = fixed.unsqueeze(0) + c * jts[group].unsqueeze(0)
            total = total + nll_of(out, y)
        return total.reshape(-1)


class _Sampled:
    """Sampled predictive: the network runs on ``mean + c * std * eps`` for each candidate, with the
    same noise (one generator state) for every candidate."""

    def __init__(self, bnn: VIModule, data: list, by_group: dict[str, list[Site]], samples: int,
                 gen: torch.Generator) -> None:
        self.bnn, self.data, self.by_group, self.samples = bnn, data, by_group, samples
        self.state = gen.get_state()
        self.gen = gen
        self.rho0 = {s.qualname: getattr(s.module, f"{s.name}_rho").detach().clone()
                     for ss in by_group.values() for s in ss}

    def _run(self, scales: dict[str, float]) -> list[Tensor]:
        outs = []
        for ss_name, ss in self.by_group.items():
            _restore(ss, self.rho0)
            _scale_spreads(ss, scales[ss_name])
        try:
            for args, kwargs, _ in self.data:
                self.gen.set_state(self.state)
                outs.append(first_tensor(self.bnn(*args, samples=self.samples, generator=self.gen, **kwargs)))
        finally:
            for ss in self.by_group.values():
                _restore(ss, self.rho0)
        return outs

    def nll(self, chosen: dict[str, float], group: str | None, grid: Tensor | None, nll_of: Any) -> Tensor:
        cands = [None] if group is None else [float(c) for c in grid]
        per_c = []
        for c in cands:
            scales = dict(chosen) if c is None else {**chosen, group: c}
            per_c.append(self._run(scales))
        total = 0
        for b, (_, _, y) in enumerate(self.data):
            total = total + nll_of(torch.stack([pc[b] for pc in per_c]), y)
        return total.reshape(-1)


@torch.no_grad()
def _restore(sites: list[Site], rho0: dict[str, Tensor]) -> None:
    for s in sites:
        getattr(s.module, f"{s.name}_rho").copy_(rho0[s.qualname])
