"""Bayesian tensors ("sites"): where their variational state lives.

A site is a parameter ``name`` of some module. Its *mean* is the parameter
itself (so the module's own forward, run outside sampling, computes with the
posterior mean); the variational family's extra parameters are registered next
to it as ``{name}_{key}`` (e.g. ``weight_rho``) and the prior's buffers as
``{name}_prior_{key}`` (e.g. ``weight_prior_loc`` for a prior centred on the
pretrained weights). ``module._vi_sites`` maps each site name to its
:class:`SiteSpec`. The sampler substitutes weight samples for the mean with
``torch.func.functional_call``, so a module needs no code of its own to become
Bayesian: the same rule serves bayesify's layers and any foreign parameter
(GPT-2 ``Conv1D``, a ViT class token, ``MultiheadAttention.in_proj_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from .priors import Prior
from .variational import VariationalFamily

ESTIMATORS = ("reparam", "local", "flipout")


@dataclass(frozen=True)
class SiteSpec:
    prior: Prior
    variational: VariationalFamily
    vkeys: tuple[str, ...]  # variational parameter keys, stored as f"{name}_{key}"
    pkeys: tuple[str, ...]  # prior buffer keys, stored as f"{name}_prior_{key}"


@dataclass(frozen=True)
class Site:
    """One Bayesian tensor found in a model (see :func:`iter_sites`)."""

    qualname: str
    module: nn.Module
    name: str
    spec: SiteSpec

    @property
    def mean(self) -> Tensor:
        return self.module._parameters[self.name]  # type: ignore[return-value]

    def vparams(self) -> dict[str, Tensor]:
        return {k: getattr(self.module, f"{self.name}_{k}") for k in self.spec.vkeys}

    def pbuffers(self) -> dict[str, Tensor]:
        return {k: getattr(self.module, f"{self.name}_prior_{k}") for k in self.spec.pkeys}

    def sampled_in_layer(self, tied: bool) -> bool:
        """True when the owning layer samples this tensor inside its forward (the sampler then
        draws nothing for it and adds its closed-form KL). ``tied``: the parameter is also
        registered in another module. Only bayesify's own layers do; foreign modules never."""
        ask = getattr(self.module, "_samples_in_layer", None)
        return bool(getattr(type(self.module), "_vi_layer", False) and ask is not None and ask(self.name, tied))


def make_bayesian(
    module: nn.Module,
    name: str,
    prior: Prior,
    variational: VariationalFamily,
    shared: dict[int, tuple[dict[str, nn.Parameter], dict[str, Tensor]]] | None = None,
) -> None:
    """Turn parameter ``module.<name>`` into a site (its value becomes the posterior mean).

    ``shared`` maps ``id(parameter)`` to state already created for a tied parameter,
    so tied parameters get one posterior, not two. A tensor the family does not cover
    (``variational.covers``: e.g. a bias under the rank-1 family) stays a plain parameter.
    """
    param = module._parameters.get(name)
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"{type(module).__name__}.{name} is not an nn.Parameter and cannot be made Bayesian")
    if not variational.covers(param):
        return
    state = shared.get(id(param)) if shared is not None else None
    if state is None:
        vparams = {k: nn.Parameter(v, requires_grad=param.requires_grad) for k, v in variational.init(param).items()}
        pbufs = prior.init(param) if variational.weight_prior else {}
        state = (vparams, pbufs)
        if shared is not None:
            shared[id(param)] = state
    vparams, pbufs = state
    for k, v in vparams.items():
        module.register_parameter(f"{name}_{k}", v)
    for k, v in pbufs.items():
        module.register_buffer(f"{name}_prior_{k}", v)
    sites = dict(getattr(module, "_vi_sites", {}))
    sites[name] = SiteSpec(prior, variational, tuple(vparams), tuple(pbufs))
    module._vi_sites = sites


def remove_bayesian(module: nn.Module, name: str) -> None:
    """Undo :func:`make_bayesian`: keep the mean as a plain parameter."""
    sites = dict(module._vi_sites)
    spec = sites.pop(name)
    for k in spec.vkeys:
        delattr(module, f"{name}_{k}")
    for k in spec.pkeys:
        delattr(module, f"{name}_prior_{k}")
    if sites:
        module._vi_sites = sites
    else:
        del module._vi_sites


def iter_sites(root: nn.Module) -> Iterator[Site]:
    """Every site under ``root``, once per distinct parameter (tied parameters share one)."""
    seen: set[int] = set()
    for prefix, module in root.named_modules():
        sites = getattr(module, "_vi_sites", None)
        if not sites:
            continue
        for name, spec in sites.items():
            param = module._parameters.get(name)
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            yield Site(f"{prefix}.{name}" if prefix else name, module, name, spec)


def validate_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
    return estimator


def analytic_kl(site: Site) -> Tensor:
    """Closed-form KL(q || prior) of one site, summed over its elements: the family's own
    shortcut (``kl_to``) where it has one, else ``torch.distributions.kl_divergence``."""
    spec = site.spec
    mean = site.mean
    kl = spec.variational.kl_to(spec.prior, mean, site.vparams(), site.pbuffers())
    if kl is not None:
        return kl
    q = spec.variational.distribution(mean, site.vparams())
    p = spec.prior.distribution(site.pbuffers(), mean)
    try:
        return torch.distributions.kl_divergence(q, p).sum()
    except NotImplementedError:
        raise ValueError(
            f"no closed-form KL between {spec.variational!r} and {spec.prior!r} (site {site.qualname}); "
            "use kl='mc' or a Normal/Laplace prior"
        ) from None
