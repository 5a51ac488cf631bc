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
from .plan import (Plan, Selection, build_plan, default_prior, default_variational, settings_of,
                   validate_mapping)
from .priors import Prior
from .recipe import arch_recipe
from .sites import make_bayesian, remove_bayesian
from .variational import VariationalFamily

__all__ = ["bayesify", "BayesianModel", "DEFAULT_PRIOR", "DEFAULT_VARIATIONAL"]


DEFAULT_PRIOR = default_prior
DEFAULT_VARIATIONAL = default_variational


class BayesianModel(VIModule):
    """A converted model: ``bnn(*args, samples=N, **kwargs)`` samples the wrapped ``.model``.

    ``bnn.model(*args)`` (outside sampling) computes with the posterior means: every
    Bayesian layer inside it is marked to use its means when called without ``samples=``
    (its parameters hold the means; sampling substitutes draws for them).
    ``conversion`` holds the JSON-able conversion spec, ``conversion_plan`` the plan.
    """

    @property
    def new_modules(self) -> list[str]:
        """Names of the converted modules that were newly initialised (zero-centred prior);
        ``bf.fit`` trains their means at a larger learning rate."""
        return list(self.conversion.get("new_modules", []))

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


Setting = Any  # one setting, or {glob or nn.Module class: setting} per module


def bayesify(
    model: nn.Module,
    prior: Prior | str | dict[Any, Any] | None = None,
    variational: VariationalFamily | str | dict[Any, Any] | None = None,
    include: Any = None,
    exclude: Any = None,
    *,
    inplace: bool = False,
    mapping: dict[type[nn.Module], type[VILayer]] | None = None,
    other_params: str = "bayesian",
    estimator: str | dict[Any, str] = "reparam",
    new_modules: Any = None,
    trace: bool = True,
    arch: Any = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> BayesianModel:
    """Convert ``model`` into a Bayesian neural network.

    Args:
        prior: a :mod:`bayesify.priors` object or name (default: Normal centred on the
            pretrained weights, scale 0.03). A shortcut string changes only the fields it
            names (``"normal:scale=0.1"`` stays centred on the pretrained weights).
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
        new_modules: which weights were newly initialised rather than pretrained; they get a
            prior centred at 0 (scale ``plan.NEW_MODULE_PRIOR_SCALE``) instead of one centred on
            their random values. ``None``: what the framework recorded (Hugging Face
            ``from_pretrained`` marks the tensors it loaded, so a new classifier head is found);
            else module globs / classes / parameter names (``missing_keys`` of
            ``from_pretrained(..., output_loading_info=True)``), or ``[]``.
        trace: annotate the plan with a ``torch.fx`` trace where the model traces.
        arch / arch_kwargs: how ``bf.save`` / ``bf.load`` rebuild the architecture
            (``"torchvision.models:resnet18"``, ``{"num_classes": 10}``); recorded in ``conversion``.

    ``prior``, ``variational`` and ``estimator`` also take ``{pattern: setting}`` per module
    (PEFT's ``rank_pattern`` convention): patterns as in ``include`` over the *original*
    module names; the most specific match wins (a module's own name before its parent's;
    among patterns for the same name, the first); ``"*"`` is the default, else the library
    default. ``bf.plan(model, prior=...)`` shows which prior each module gets::

        bnn = bf.bayesify(model, include=["bert.encoder.layer.5", "classifier"],
                          prior={"bert.*": "normal:scale=0.01", "*": "normal:loc=0,scale=1"})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bayesify() expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, BayesianModel):
        raise TypeError("model is already a bayesify.BayesianModel; convert the original model instead")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    settings = settings_of(model, prior, variational, estimator, new_modules)
    rules = validate_mapping(mapping)
    selection = Selection.of(include, exclude)
    recipe = None
    if arch is not None or arch_kwargs is not None:
        recipe = arch_recipe(model, arch, arch_kwargs, embed=False)[0]
    the_plan, swaps, generic = build_plan(model, selection, rules, other_params, settings, trace)
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
    resolved: dict[str, Any] = {}  # module name -> its settings, for the recorded spec
    for name, _, site in swaps:
        old = by_name[name]
        new_of[id(old)] = rules[type(old)].from_point(old, site.prior, site.variational, site.estimator, shared)
        resolved[name] = site
    for name, _, names, site in generic:
        module = by_name[name]
        for pname in names:
            make_bayesian(module, pname, site.prior, site.variational, shared)
        resolved[name] = site
    # Replace every reference (a module registered under two names is swapped in both places).
    for parent in list(by_name.values()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                parent._modules[key] = new_of[id(child)]
    if id(target) in new_of:  # the model itself is a mapped layer
        target = new_of[id(target)]
    spec = {
        **_settings_spec(settings, resolved),
        "include": None if selection.include is None else [_pattern_spec(x) for x in selection.include],
        "exclude": [_pattern_spec(x) for x in selection.exclude],
        "other_params": other_params,
        "custom_mapping": mapping is not None,
        "new_modules": [name for name, site in resolved.items() if site.new],
    }
    if recipe is not None:
        spec["arch"] = recipe
    return BayesianModel(target, spec, the_plan)


def _settings_spec(settings: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    """``prior`` / ``variational`` / ``estimator`` as JSON: one spec when every module got the
    same, else ``{exact module name: spec, ..., "*": default}`` with what each converted module
    got (new modules' zero-centred priors included; every module listed, since a name also
    matches its children), which ``bayesify(new_modules=[])`` redoes exactly."""
    out: dict[str, Any] = {}
    for key, one in (("prior", lambda p: p.spec()), ("variational", lambda q: q.spec()), ("estimator", str)):
        default = getattr(settings, key).default
        values = {name: getattr(site, key) for name, site in resolved.items()}
        if all(v == default for v in values.values()):
            out[key] = one(default)
        else:
            out[key] = {**{_escape(n): one(v) for n, v in values.items()}, "*": one(default)}
    return out


def _escape(name: str) -> str:
    """A module name as a glob that matches only itself (names may hold ``[`` and ``*``)."""
    import glob

    return glob.escape(name) if name else name

def _deepcopy_with_names(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"could not copy the model ({type(exc).__name__}: {exc}); "
                        "pass inplace=True to convert it in place") from None
