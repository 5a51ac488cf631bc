"""``bf.bayesify``: convert any ``nn.Module`` into a Bayesian :class:`BayesianModel`.

Every check happens first (``build_plan``); then the model is deep-copied (unless
``inplace=True``), mapped layers are swapped by qualified name for their
variational counterparts (means *are* the pretrained tensors, no extra copy),
and the remaining parameters get the general rule (``bayesify.sites``).
Tied parameters keep one posterior.

Example::

    >>> import torchvision, bayesify as bf
    >>> bnn = bf.bayesify(torchvision.models.resnet18(num_classes=10))
    >>> bnn(torch.randn(2, 3, 32, 32), samples=4).shape
    torch.Size([4, 2, 10])
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from .module import VIModule
from .nn import VILayer
from .plan import Plan, Selection, _vparams_per_param, build_plan, validate_mapping
from .priors import Prior, get_prior
from .recipe import arch_recipe
from .sites import make_bayesian, remove_bayesian, validate_estimator
from .variational import VariationalFamily, get_variational

__all__ = ["bayesify", "BayesianModel", "DEFAULT_PRIOR", "DEFAULT_VARIATIONAL"]


def default_prior() -> Prior:
    """Normal centred on the pretrained weights, scale 0.03 (the recipe in docs/uncertainty.md).

    Where the data do not pin a weight, the ELBO moves its spread towards the prior scale,
    so this is the noise level a long fine-tune converges to; 0.03 is about half the typical
    weight of a small CNN or a MiniLM block.
    """
    from .priors import Normal

    return Normal(loc="pretrained", scale=0.03)


def default_variational() -> VariationalFamily:
    """Mean-field Normal, initial std 10 % of each pretrained weight's magnitude.

    Relative, so one setting fits every weight scale; 0.1 leaves a converted model's
    predictions nearly unchanged at step 0 (larger spreads hurt deep transformers) while a
    short fine-tune has spreads large enough to matter (``1e-3`` barely moves from the
    point model). See the recipe in docs/uncertainty.md.
    """
    from .variational import MeanFieldNormal

    return MeanFieldNormal(init_std=0.1, relative=True)


DEFAULT_PRIOR = default_prior
DEFAULT_VARIATIONAL = default_variational


class BayesianModel(VIModule):
    """A converted model: ``bnn(*args, samples=N, **kwargs)`` samples the wrapped ``.model``.

    ``bnn.model(*args)`` (outside sampling) computes with the posterior means: every
    Bayesian layer inside it is marked to use its means when called without ``samples=``
    (its parameters hold the means; sampling substitutes draws for them).
    ``conversion`` holds the JSON-able conversion spec, ``conversion_plan`` the plan.
    """

    def __init__(self, model: nn.Module, conversion: dict[str, Any], conversion_plan: Plan | None = None) -> None:
        super().__init__()
        for m in model.modules():
            if isinstance(m, VIModule):
                m._means_outside_sampling = True
        self.model = model
        self.conversion = conversion
        self.conversion_plan = conversion_plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def to_point(self) -> nn.Module:
        """A deterministic copy of the wrapped model with the posterior means as weights."""
        point = copy.deepcopy(self.model)
        replaced: dict[int, nn.Module] = {}
        for _, parent in list(point.named_modules(remove_duplicate=False)):
            for key, child in list(parent._modules.items()):
                if isinstance(child, VILayer):
                    if id(child) not in replaced:
                        replaced[id(child)] = child.to_point()
                    parent._modules[key] = replaced[id(child)]
        for _, mod in point.named_modules():
            for name in list(getattr(mod, "_vi_sites", {})):
                remove_bayesian(mod, name)
        return point


def _pattern_spec(p: Any) -> str:
    return p if isinstance(p, str) else f"class:{p.__module__}:{p.__qualname__}"


def bayesify(
    model: nn.Module,
    prior: Prior | str | None = None,
    variational: VariationalFamily | str | None = None,
    include: Any = None,
    exclude: Any = None,
    *,
    inplace: bool = False,
    mapping: dict[type[nn.Module], type[VILayer]] | None = None,
    other_params: str = "bayesian",
    estimator: str = "reparam",
    trace: bool = True,
    arch: Any = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> BayesianModel:
    """Convert ``model`` into a Bayesian neural network.

    Args:
        prior: a :mod:`bayesify.priors` object or name (default: Normal centred on the
            pretrained weights, scale 0.03).
        variational: a :mod:`bayesify.variational` family or name (default:
            ``MeanFieldNormal(init_std=0.1, relative=True)``: std 10 % of each weight's
            magnitude); ``"pointmass"`` reproduces the model exactly.
        include / exclude: glob patterns over ``model.named_modules()`` names and/or module
            classes; a match selects the module and its whole subtree.
        inplace: convert ``model`` itself instead of a deep copy.
        mapping: exact-type rules ``{nn.Linear: bf.nn.VILinear, ...}`` (default
            ``bf.nn.DEFAULT_MAPPING``; pass ``{**DEFAULT_MAPPING, MyLayer: MyVILayer}`` to extend).
        other_params: ``"bayesian"`` (the general rule: every other floating-point parameter,
            e.g. GPT-2 ``Conv1D``, a ViT class token, gets a posterior) or ``"deterministic"``.
            BatchNorm parameters always stay deterministic.
        estimator: ``"reparam"`` (per-sample weights, gives ``log_probs``), ``"local"`` or
            ``"flipout"`` (mapped linear / conv layers; analytic KL).
        trace: annotate the plan with a ``torch.fx`` trace where the model traces.
        arch / arch_kwargs: how ``bf.save`` / ``bf.load`` rebuild the architecture
            (``"torchvision.models:resnet18"``, ``{"num_classes": 10}``); recorded in ``conversion``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bayesify() expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, BayesianModel):
        raise TypeError("model is already a bayesify.BayesianModel; convert the original model instead")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    p = get_prior(prior, default_prior())
    q = get_variational(variational, default_variational())
    validate_estimator(estimator)
    rules = validate_mapping(mapping)
    selection = Selection.of(include, exclude)
    recipe = None
    if arch is not None or arch_kwargs is not None:
        recipe = arch_recipe(model, arch, arch_kwargs, embed=False)[0]
    the_plan, swaps, generic = build_plan(model, selection, rules, other_params, _vparams_per_param(q), trace)
    if not the_plan.converted:  # a "Bayesian" model without a single random weight is a mistake
        raise ValueError(f"nothing to convert: include={include!r}, exclude={exclude!r}, other_params="
                         f"{other_params!r} leave no parameter of {type(model).__name__} Bayesian "
                         f"({len(the_plan.skipped)} modules skipped); widen include or narrow exclude "
                         "(bf.plan(model, ...) shows what each module would become)")
    for w in the_plan.warnings:
        warnings.warn(w, UserWarning, stacklevel=2)

    target = model if inplace else _deepcopy_with_names(model)
    by_name = dict(target.named_modules(remove_duplicate=False))
    shared: dict = {}  # id(point parameter) -> variational state, so tied parameters share a posterior
    new_of: dict[int, nn.Module] = {}
    for name, _ in swaps:
        old = by_name[name]
        new_of[id(old)] = rules[type(old)].from_point(old, p, q, estimator, shared)
    for name, _, names in generic:
        module = by_name[name]
        for pname in names:
            make_bayesian(module, pname, p, q, shared)
    # Replace every reference (a module registered under two names is swapped in both places).
    for parent in list(by_name.values()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                parent._modules[key] = new_of[id(child)]
    if id(target) in new_of:  # the model itself is a mapped layer
        target = new_of[id(target)]
    spec = {
        "prior": p.spec(),
        "variational": q.spec(),
        "include": None if selection.include is None else [_pattern_spec(x) for x in selection.include],
        "exclude": [_pattern_spec(x) for x in selection.exclude],
        "other_params": other_params,
        "estimator": estimator,
        "custom_mapping": mapping is not None,
    }
    if recipe is not None:
        spec["arch"] = recipe
    return BayesianModel(target, spec, the_plan)


def _deepcopy_with_names(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"could not copy the model ({type(exc).__name__}: {exc}); "
                        "pass inplace=True to convert it in place") from None
