"""Natural-gradient variational training: :class:`IVON` (Shen et al., ICML 2024, Algorithm 1).

IVON keeps, per Bayesian weight, a momentum ``g`` and a Hessian estimate ``h`` and sets
the Gaussian posterior ``q = N(m, sigma^2)`` by

    g     <- beta1 g + (1 - beta1) g_hat
    h     <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 (h - h_hat)^2 / (2 (h + delta))   (*)
    m     <- m - lr (g / (1 - beta1^t) + delta (m - m0)) / (h + delta)
    sigma  = 1 / sqrt(ess (h + delta))

where ``g_hat`` is the gradient of the *mean* loss (no KL: the prior enters through
``delta``) at weights sampled from ``q`` and ``h_hat = g_hat * (w - m) / sigma^2`` the
reparameterisation estimate of the Hessian diagonal. The posterior mean is each site's
weight; ``sigma`` is written into the site's ``rho`` (``softplus(rho) = sigma``) after
every step, so ``bf.predict``, ``bf.save`` / ``bf.load`` and the CLI see what the
optimiser holds.

How ``h_hat`` is obtained without storing the noise: the sampler draws
``w_s = m + softplus(rho) * eps_s`` and the loss averages over the ``S`` samples, so the
gradient reaching ``rho`` is ``(1/S) sum_s g_s eps_s * sigmoid(rho)``; dividing by
``sigmoid(rho) * sigma`` gives ``(1/S) sum_s g_s (w_s - m) / sigma^2``, the paper's
estimator averaged over the samples. More generally it is ``d E_q[loss] / d sigma / sigma``,
whose expectation is ``E_q[diag Hessian]`` (Price's theorem), so the local
reparameterisation and Flipout estimators serve as well.

Where this differs from the paper, for robustness (the reference package breaks down for
some Hessian initialisations and learning rates):

- ``h`` is a running average of the estimates (step ``t`` weighs its estimate by
  ``max(1 - beta2, 1 / (t + 10))``), then the paper's exponential average; it starts from
  the model's current spreads (``h0 = 1 / (ess mean(sigma0^2)) - delta`` per tensor),
  which count as 10 estimates, so no Hessian init needs tuning;
- ``delta`` comes from each site's prior (``Normal(loc, scale)``: ``1 / (ess scale^2)``,
  pulling towards ``loc``, the pretrained weights for ``loc="pretrained"``);
- (*) ``a = h + delta`` moves by ``d = w (h_hat - h)`` (unbiased: ``h`` is an average of
  the estimates) but keeps ``h >= 0`` (no spread above the prior's; with no prior,
  ``delta = 0``, it falls at most tenfold in one step). The estimate's noise includes ``g(m) eps / sigma`` (zero mean, but
  large where the gradient at the mean is large and the spread small); the paper's
  correction ``d^2 / (2a)`` (and an update in log space) turns that noise into an upward
  drift, which shrinks ``sigma`` and feeds the noise: measured in
  tests/test_optim.py's linear model, the estimate ran away to 1e11 instead of ~4;
- each weight's ``h`` is kept at least ``hess_floor`` (0.5) times its tensor's running mean
  estimate (the unclipped average of the tensor-mean of ``h_hat``: unbiased, and low-noise
  because it pools the tensor's weights). Where the estimator's noise dominates (a cold
  posterior: small spreads, large ``g(m) eps / sigma``), the clipped per-weight average moves by
  at most ``3 w a`` per step in either direction, so an ``h`` that starts or falls far below its
  expectation cannot climb back: measured on benchmarks/quality.py's gap task at ``ess = 100
  N``, the first layer's ``h`` stayed ~100x below ``E[h_hat]`` for all 300 steps (spreads ~10x
  too wide). The floor biases weights whose curvature is below half the tensor's mean (their
  spreads are narrower than the mean-field optimum; ``hess_floor=0`` for the paper's fixed point);
  it also keeps weights with no curvature at the mean (dead ReLU units) off the prior's spread;
- each step of a mean is clipped to ``clip_radius`` (0.1) posterior standard deviations, per
  weight. A diagonal Newton step ``lr g / (h + delta)`` is stable only for ``lr < 2 / lambda_max``
  of ``D^-1/2 H D^-1/2`` (``D = diag(H) + delta``), which measures how coupled the weights are:
  on the gap task's pretrained 1-50-50-1 ReLU net it is 54 at ``ess = N`` with the default
  prior ``Normal("pretrained", 0.03)`` (the prior's ``delta`` damps it), 193 at 10 N, 379 at 100 N
  and 430-570 with a prior of scale 1. With ``lr = 0.1`` and the former radius of 3 the first
  step at ``ess = 10 N`` already moved every weight ~0.5 sigma along the (noisy) gradient and
  killed ReLU units (test RMSE 0.12 -> 0.30-0.58, never recovered); at 0.1 sigma per step the
  mean travels up to 30 sigma in 300 steps, and a start far away (the linear model of
  tests/test_optim.py: 87 sigma) takes ~700 steps instead of ~100 (``clip_radius=3`` there).

Example::

    >>> bnn = bf.bayesify(model)
    >>> opt = bf.optim.IVON(bnn, lr=0.1, ess=len(train_set))
    >>> loss_fn = bf.NLLLoss("categorical")              # no KL term: IVON adds the prior
    >>> bnn.train()
    >>> for x, y in loader:
    ...     loss = loss_fn(bnn(x, samples=2), y)
    ...     opt.zero_grad(); loss.backward(); opt.step()
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._normal import keep_spread, kept_spread
from .priors import Flat, Laplace, Normal, Prior, ScaleMixtureNormal, StudentT
from .sites import Site, iter_sites
from .variational import MeanFieldNormal

__all__ = ["IVON", "hessian_estimate", "prior_precision"]

#: How many estimates the starting Hessian counts as. With 0, h after the first step is one
#: noisy estimate clamped at 0: half the weights jumped to the prior's spread, and a
#: converted MLP with a Normal("pretrained", 0.3) prior died in the first steps (RMSE 2.0
#: on the gap task of benchmarks/quality.py, against 0.12 with 10).
_START_WEIGHT = 10
#: Each Hessian estimate enters the average clipped to h +- _CLIP * (h + delta).
_CLIP = 3.0


def prior_precision(prior: Prior) -> tuple[float, str | float]:
    """``(1 / variance, centre)`` of a prior: the Gaussian that IVON's weight decay stands for.

    The centre is ``"pretrained"`` (the site's prior buffer) or a number. Non-Gaussian priors
    are matched by their variance (a flat prior: precision 0)."""
    if isinstance(prior, Flat):
        return 0.0, 0.0
    loc = getattr(prior, "loc", 0.0)
    if isinstance(prior, (Normal,)):
        var = prior.scale ** 2
    elif isinstance(prior, Laplace):
        var = 2 * prior.scale ** 2
    elif isinstance(prior, StudentT):
        var = prior.scale ** 2 * (prior.df / (prior.df - 2) if prior.df > 2 else 3.0)
    elif isinstance(prior, ScaleMixtureNormal):
        var = prior.pi * prior.sigma1 ** 2 + (1 - prior.pi) * prior.sigma2 ** 2
    else:
        raise TypeError(f"IVON needs a prior with a variance (Normal, Laplace, StudentT, ScaleMixtureNormal, Flat), "
                        f"got {prior!r}; pass weight_decay= to set the prior precision directly")
    return 1.0 / var, loc


def hessian_estimate(rho: Tensor) -> Tensor:
    """The reparameterisation estimate of the Hessian diagonal from the gradient in ``rho.grad``:
    ``(1/S) sum_s g_s eps_s / sigma`` (the gradient over ``dsigma/drho = sigmoid(rho)``, over sigma)."""
    r = rho.detach().float()
    return rho.grad.float().div(torch.sigmoid(r).mul_(F.softplus(r)).clamp_min_(1e-38))


def _is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameters), without importing torch.distributed."""
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _scalar(t: Tensor) -> float:
    """The value of a 0-d reduction; over the whole tensor where ``t`` came from a sharded DTensor
    (``float()`` of its pending partial result would read this rank's part only)."""
    return float(t.full_tensor()) if _is_dtensor(t) else float(t)


def _check_number(name: str, value: Any, low: float, high: float = math.inf, *, closed_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (value >= low if closed_low else value > low) and value <= high
    if not ok or math.isnan(value):
        bound = f"{'>=' if closed_low else '>'} {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


class IVON(torch.optim.Optimizer):
    """Improved Variational Online Newton over the Bayesian sites of a bayesify model.

    Args:
        params: the model (its sites' means are trained), or an iterable of site means /
            param groups of the model (then pass ``model=``). Spread parameters (``*_rho``)
            belong to the optimiser and are skipped if listed.
        lr: step size of the Newton-like mean update (1.0 is a full Newton step).
        ess: effective sample size, normally the number of training points (larger = colder,
            smaller spreads). Required.
        betas: ``(beta1, beta2)``: momentum of the gradient and of the Hessian estimate.
        weight_decay: ``delta``, the prior precision per data point; default (None) from each
            site's prior: ``1 / (ess * variance)``, centred where the prior is (the pretrained
            weights for ``loc="pretrained"``). A number overrides it (centred on 0).
        hess_init: initial Hessian estimate; default (None) from the model's current spreads
            (per tensor: ``1 / (ess * mean(std^2)) - delta``). Step ``t`` weighs its estimate by
            ``max(1 - beta2, 1 / (t + 10))`` (a running average in which the start counts as 10
            estimates, then the paper's exponential one), so the start fades within ~100 steps.
        clip_radius: largest change of a mean in one step, in posterior standard deviations
            (``math.inf``: no clipping). The default 0.1 keeps the diagonal Newton step from
            overshooting on coupled weights at cold ``ess`` or with wide priors (module
            docstring); a larger one (e.g. 3, the former default) travels faster from a start
            many standard deviations away where the weights are nearly uncoupled.
        hess_floor: each weight's Hessian estimate is kept at least this fraction of its
            tensor's running mean estimate (0: the paper's per-weight fixed point).
        max_grad_norm: clip the gradient of the means to this global norm before the update
            (the spreads' gradients, which carry the Hessian estimate, are never clipped).
            Use this rather than ``clip_grad_norm_(bnn.parameters())``, which would also scale
            the Hessian estimate.
        model: the model, when ``params`` is not.

    The loss must not contain the KL term (use :class:`bayesify.NLLLoss`, or ``ELBOLoss``
    with ``kl_weight=0``): an ``ELBOLoss`` with a KL term raises ``ValueError`` on an output
    of a model that an IVON optimiser trains (``opt.release()`` hands the model back).

    Memory: two float32 tensors per Bayesian weight (momentum and Hessian), as Adam (plus one scalar
    per tensor, the running mean Hessian estimate of ``hess_floor``), and (CPU,
    float32 spreads) ``softplus(rho)`` kept after each step for the next draw, its backward and
    the next step, one more tensor not in ``state_dict()`` (``opt.keep_spreads = False``: none).
    Mixed precision: the state is float32 whatever the parameters' dtype.
    Distributed: under ``DistributedDataParallel`` every rank sees the all-reduced gradients
    of the means and spreads, so the Hessian estimates agree across ranks. Under FSDP2
    (``fully_shard``) each mean and its spread are DTensors sharded alike: the state is
    created sharded the same way (each rank holds its part), the prior's centre (the
    pretrained weights, a buffer FSDP does not shard) is sliced to match, and the few
    reductions (the start's mean variance, ``max_grad_norm``) are over the whole tensors, so
    the steps equal DDP's (tested with two gloo processes). FSDP1's flattened parameters are
    not supported (a mean and its spread would share one flat tensor).
    """

    def __init__(self, params: nn.Module | Iterable[Any], lr: float = 0.1, ess: float | None = None, *,
                 betas: tuple[float, float] = (0.9, 0.9999), weight_decay: float | None = None,
                 hess_init: float | None = None, clip_radius: float = 0.1, hess_floor: float = 0.5,
                 max_grad_norm: float | None = None, model: nn.Module | None = None) -> None:
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("pass either the model as params or model=, not two different modules")
            model = params
            params = None
        if not isinstance(model, nn.Module):
            raise TypeError("IVON needs the bayesify model: IVON(bnn, ...) or IVON(param_groups, model=bnn, ...), "
                            f"got model={type(model).__name__}")
        if ess is None:
            raise ValueError("ess is required: pass the number of training points, e.g. IVON(bnn, ess=len(train_set))")
        ess = _check_number("ess", ess, 0.0)
        _check_number("lr", lr, 0.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0, closed_low=True)
        if betas[0] >= 1:
            raise ValueError(f"betas[0] must be < 1, got {betas[0]!r}")
        _check_number("betas[1]", betas[1], 0.0, 1.0, closed_low=True)
        if betas[1] >= 1:
            raise ValueError(f"betas[1] must be < 1, got {betas[1]!r}")
        if weight_decay is not None:
            _check_number("weight_decay", weight_decay, 0.0, closed_low=True)
        if hess_init is not None:
            _check_number("hess_init", hess_init, 0.0, closed_low=True)
        _check_number("clip_radius", clip_radius, 0.0)
        _check_number("hess_floor", hess_floor, 0.0, closed_low=True)
        if max_grad_norm is not None:
            _check_number("max_grad_norm", max_grad_norm, 0.0)

        sites = {id(s.mean): s for s in iter_sites(model)}
        if not sites:
            raise ValueError("the model has no Bayesian sites: convert it with bf.bayesify(model) or build it "
                             "from bf.nn layers")
        for s in sites.values():
            if type(s.spec.variational) is not MeanFieldNormal:
                raise TypeError(f"IVON trains mean-field Normal posteriors; site {s.qualname} has "
                                f"{s.spec.variational!r} (convert with variational='meanfield')")
        rhos = {id(s.vparams()["rho"]) for s in sites.values()}
        if params is None:
            params = [s.mean for s in sites.values() if s.mean.requires_grad]
            others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in sites
                      and id(p) not in rhos]
            if others:
                warnings.warn(f"IVON trains the model's {len(params)} Bayesian tensors; {len(others)} other trainable "
                              f"parameter(s) ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) are not "
                              "stepped: give them their own optimiser or freeze them", stacklevel=2)
        defaults = dict(lr=lr, ess=ess, betas=tuple(betas), weight_decay=weight_decay, hess_init=hess_init,
                        clip_radius=clip_radius, hess_floor=hess_floor, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        for group in self.param_groups:
            kept = []
            for p in group["params"]:
                if id(p) in rhos:
                    continue  # the spreads are the optimiser's output, not its input
                if id(p) not in sites:
                    raise ValueError("IVON steps Bayesian tensors only; got a parameter of shape "
                                     f"{tuple(p.shape)} that is not a site mean of the model: give it its own "
                                     "optimiser")
                kept.append(p)
            group["params"] = kept
        self._sites = sites
        self._model = model
        # ELBOLoss refuses a KL term for a model whose prior an optimiser applies (loss.py).
        model._prior_in_optimizer = type(self).__name__

    # -- state --------------------------------------------------------------------------------
    def _site_decay(self, site: Site, group: dict[str, Any]) -> tuple[float, Tensor | float]:
        if group["weight_decay"] is not None:
            return float(group["weight_decay"]), 0.0
        prec, loc = prior_precision(site.spec.prior)
        centre: Tensor | float = site.pbuffers()["loc"] if loc == "pretrained" else float(loc)
        if isinstance(centre, Tensor) and _is_dtensor(site.mean) and not _is_dtensor(centre):
            centre = self._sharded_like(site.mean, centre)
        return prec / group["ess"], centre

    def _sharded_like(self, p: Tensor, full: Tensor) -> Tensor:
        """``full`` (a whole tensor on every rank, e.g. the pretrained weights FSDP does not shard)
        laid out as the sharded parameter ``p``: each rank keeps its own slice, no communication."""
        from torch.distributed.tensor import distribute_tensor

        cache = self.__dict__.setdefault("_sharded", {})
        hit = cache.get(id(p))
        if hit is None or hit[0] is not full or hit[1] != full._version:
            cache[id(p)] = hit = (full, full._version,
                                  distribute_tensor(full.detach(), p.device_mesh, p.placements, src_data_rank=None))
        return hit[2]

    def _init_state(self, p: Tensor, site: Site, group: dict[str, Any], delta: float) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        state["momentum"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["hess_init"] is not None:
            state["hess"] = torch.full_like(p, group["hess_init"], dtype=torch.float32)
        else:
            # One value per tensor, from its mean variance: a per-weight start would keep the
            # tiny spreads of near-zero weights (relative init) for many steps.
            var = _scalar(F.softplus(site.vparams()["rho"].detach().float()).square().mean())
            state["hess"] = torch.full_like(p, max(1.0 / (group["ess"] * max(var, 1e-30)) - delta, 0.0),
                                            dtype=torch.float32)
        return state

    def hessian(self, p: Tensor) -> Tensor | None:
        """The Hessian estimate of site mean ``p`` (None before its first step)."""
        st = self.state.get(p)
        return None if not st else st["hess"]

    def sync_spreads(self) -> None:
        """Write ``std = 1 / sqrt(ess (h + delta))`` into every stepped site's ``rho``."""
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.get(p)
                    if st:
                        site = self._sites[id(p)]
                        delta, _ = self._site_decay(site, group)
                        self._write_rho(site, st["hess"], delta, group["ess"])

    def _write_rho(self, site: Site, hess: Tensor, delta: float, ess: float) -> None:
        self._set_rho(site.vparams()["rho"], hess.add(delta).clamp_min_(1e-30), ess)

    @staticmethod
    def _set_rho(rho: Tensor, a: Tensor, ess: float | None = None) -> None:
        """``rho = inverse_softplus(1 / sqrt(ess * a))``; ``a`` (float32, ``h + delta``) is overwritten."""
        std = a.mul_(ess).rsqrt_()
        # inverse_softplus, in place: log(expm1(std)) (std is far below 20 wherever this matters)
        if float(std.max()) > 20:
            rho.copy_(torch.where(std > 20, std, std.expm1().log_()))
        elif rho.dtype == std.dtype and rho.is_contiguous() and not _is_dtensor(rho):
            torch.expm1(std, out=rho).log_()  # no copy pass
        else:
            rho.copy_(std.expm1_().log_())

    #: Keep ``softplus(rho)`` after each step for the next draw, its backward and the next step
    #: (one softplus pass per weight instead of three; one float32 tensor per weight of memory).
    keep_spreads = True

    def _keep_spread(self, rho: Tensor, old: Tensor | None) -> None:
        """``softplus(rho)``, computed once, for the next draw of this spread (see
        :func:`bayesify._normal.kept_spread`): into the old one's memory where there is one (a graph
        that still reads it saved ``rho``, whose write just now makes its backward raise)."""
        if not (self.keep_spreads and rho.dtype == torch.float32 and rho.device.type == "cpu"
                and rho.is_contiguous() and not _is_dtensor(rho)):
            return
        flat = rho.detach().reshape(-1)
        out = old if old is not None else torch.empty_like(flat)
        keep_spread(rho, torch._C._nn.softplus(flat, 1.0, 20.0, out=out))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for site in self._sites.values():
            rho = site.vparams()["rho"]
            if rho.grad is not None:
                if set_to_none:
                    rho.grad = None
                else:
                    rho.grad.zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype; IVON's state stays float32.
        params = [p for group in self.param_groups for p in group["params"]]
        for i, saved in state_dict["state"].items():
            st = self.state.get(params[int(i)])
            if st:
                for k in ("momentum", "hess", "hess_mean"):  # (hess_mean: a CPU scalar, see step)
                    if k in saved:
                        st[k] = saved[k].detach().to(device="cpu" if k == "hess_mean" else st[k].device,
                                                     dtype=torch.float32, copy=True)
        self.sync_spreads()

    def release(self) -> None:
        """Hand the model back (e.g. to continue with an ELBO and another optimiser)."""
        self._model.__dict__.pop("_prior_in_optimizer", None)

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            ess, lr, radius = group["ess"], group["lr"], group["clip_radius"]
            scale = 1.0
            if group["max_grad_norm"] is not None:
                grads = [p.grad for p in group["params"] if p.grad is not None]
                if grads:
                    norm = math.sqrt(sum(_scalar(g.float().square().sum()) for g in grads))
                    scale = min(1.0, group["max_grad_norm"] / (norm + 1e-12))
            for p in group["params"]:
                site = self._sites[id(p)]
                rho = site.vparams()["rho"]
                if p.grad is None and rho.grad is None:
                    continue
                delta, centre = self._site_decay(site, group)
                st = self.state[p] if self.state.get(p) else self._init_state(p, site, group, delta)
                st["step"] += 1
                t = st["step"]
                hess, mom = st["hess"], st["momentum"]
                # Written for few passes and three allocations per tensor (allocating weight-sized
                # temporaries dominated: a 2.4M-weight MLP's step went 390 -> ~100 ms).
                # Passes saved where a clamp cannot bite (h >= 0: h + delta >= delta) and by fused
                # forms (lerp, add with alpha): ResNet-18's step (11.2 M weights, one thread) 165 ->
                # ~135 ms; softplus, sigmoid and the inverse softplus are most of the rest.
                r = rho.detach().float()
                kept = kept_spread(rho) if rho.dtype == torch.float32 else None
                sigma = F.softplus(r) if kept is None else kept.view(r.shape)  # read only
                a = hess.add(delta)
                if delta < 1e-12:
                    a.clamp_min_(1e-12)
                if rho.grad is not None:
                    # d = h_hat - h, with h_hat = rho.grad / (sigmoid(rho) sigma) (see hessian_estimate)
                    d = torch.sigmoid(r).mul_(sigma).clamp_min_(1e-38)
                    torch.div(rho.grad.float(), d, out=d)
                    w = max(1.0 - beta2, 1.0 / (t + _START_WEIGHT))
                    floor = delta
                    if group.get("hess_floor", 0.0):  # (groups saved before the floor existed: none)
                        hm = st.get("hess_mean")
                        if hm is None:
                            hm = st["hess_mean"] = torch.tensor(_scalar(hess.mean()), dtype=torch.float32)
                        hm.mul_(1 - w).add_(_scalar(d.mean()) * w)
                        floor = delta + group["hess_floor"] * max(float(hm), 0.0)
                    d.sub_(hess)
                    # a = h + delta moves by w d, d clipped to +- 3a: symmetric, so the average stays
                    # unbiased for the estimator's symmetric noise, and no single draw collapses h;
                    # h >= 0, or with no prior (delta = 0) a falls at most 10x (module docstring, (*)).
                    d.div_(a).clamp_(-_CLIP, _CLIP).mul_(a)
                    torch.add(a, d, alpha=w, out=d)
                    if delta == 0:
                        torch.maximum(d, a.mul_(0.1), out=d)
                        if floor > 0:
                            d.clamp_min_(floor)
                    else:
                        d.clamp_min_(floor)
                    torch.sub(d, delta, out=hess).nan_to_num_(nan=0.0, posinf=1e30)
                else:
                    d = torch.empty_like(a)
                if p.grad is None:
                    mom.mul_(beta1)
                elif scale == 1.0 and p.grad.dtype == mom.dtype:
                    mom.lerp_(p.grad, 1 - beta1)  # beta1 mom + (1 - beta1) g in one pass
                else:
                    mom.mul_(beta1).add_(p.grad, alpha=(1 - beta1) * scale)
                # The step is c (mom + (delta / c) (m - centre)) / (h + delta) with the bias correction
                # c = 1 / (1 - beta1^t) applied at the end (folded into lr and the clip: one pass less).
                c = 1.0 / (1 - beta1 ** t)
                denom = torch.add(hess, delta, out=d)
                if delta < 1e-30:  # as _write_rho (sync_spreads): the same rho after a state_dict round trip
                    denom.clamp_min_(1e-30)
                if delta:  # the prior's pull: delta (m - centre)
                    step = torch.add(mom, p, alpha=delta / c, out=a)
                    if isinstance(centre, Tensor):
                        step.sub_(centre, alpha=delta / c)
                    elif centre:
                        step.sub_(centre * delta / c)
                    step.div_(denom)
                else:
                    step = torch.div(mom, denom, out=a)
                if math.isfinite(radius):  # |lr * c * step| <= radius * sigma
                    bound = radius / (lr * c)
                    step.div_(sigma).clamp_(-bound, bound).mul_(sigma)
                if p.dtype == torch.float32:
                    p.sub_(step, alpha=lr * c)
                else:
                    p.sub_(step.mul_(lr * c).to(p.dtype))
                # sigma = 1 / sqrt(ess (h + delta)) into rho = inverse_softplus(sigma)
                self._set_rho(rho, denom, ess)
                rho.grad = None
                self._keep_spread(rho, kept)
        return loss
