"""``bf.plan``: what ``bayesify()`` would convert, and what it skips and why. Changes nothing.

The plan walks the module tree (the source of truth for the swap) and, where the
model traces with ``torch.fx`` (mapped layers as leaves), annotates it with the
graph: how often each module is called, which raw parameters the forward reads
directly, and which modules the forward never calls. Where tracing fails (most
Hugging Face models: data-dependent control flow), the plan says so and uses
the module tree alone; both paths produce the same converted model.

Example::

    >>> p = bf.plan(torchvision.models.resnet18())
    >>> print(p)              # a rich table
    >>> p.converted[0].name
    'conv1'
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .nn import DEFAULT_MAPPING, VILayer

__all__ = ["plan", "Plan", "PlanEntry", "SkipEntry", "Selection", "PerModule", "new_parameters"]

OTHER_PARAMS = ("bayesian", "deterministic")


@dataclass
class PlanEntry:
    """One module (or one raw parameter) that becomes Bayesian."""

    name: str
    type: str
    becomes: str
    params_before: int
    params_after: int
    calls: int | None = None  # from the fx graph; None when the model did not trace
    prior: str = ""  # the prior its tensors get (short form)
    new: bool = False  # newly initialised (not loaded from a checkpoint): zero-centred prior


@dataclass
class SkipEntry:
    name: str
    type: str
    reason: str


@dataclass
class Plan:
    converted: list[PlanEntry] = field(default_factory=list)
    skipped: list[SkipEntry] = field(default_factory=list)
    traced: bool = False
    trace_note: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(e.params_before for e in self.converted)

    @property
    def params_after(self) -> int:
        return sum(e.params_after for e in self.converted)

    def table(self) -> Any:
        """A ``rich.table.Table`` of the plan (the CLI's ``inspect`` prints it)."""
        from rich.table import Table

        title = "bayesify plan — graph: " + ("torch.fx trace" if self.traced else "module tree")
        t = Table(title=title, caption=self.trace_note or None)
        for col in ("module", "type", "becomes", "prior", "params", "params after", "fx calls"):
            t.add_column(col, justify="right" if col in ("params", "params after", "fx calls") else "left",
                         overflow="fold")
        for e in self.converted:
            prior = f"{e.prior} [i](new)[/i]" if e.new else e.prior
            t.add_row(e.name or "(root)", e.type, e.becomes, prior, f"{e.params_before:,}", f"{e.params_after:,}",
                      "-" if e.calls is None else str(e.calls))
        unselected = [s for s in self.skipped if s.reason == _NOT_SELECTED]
        for s in self.skipped:
            if s.reason != _NOT_SELECTED or len(unselected) <= _MAX_UNSELECTED_ROWS:
                t.add_row(s.name or "(root)", s.type, f"[dim]skipped: {s.reason}[/dim]", "", "", "", "")
        if len(unselected) > _MAX_UNSELECTED_ROWS:  # e.g. the frozen blocks of a large model
            names = ", ".join(s.name for s in unselected[:3])
            t.add_row(f"[dim]{names}, ... ({len(unselected)} modules)[/dim]", "",
                      f"[dim]skipped: {_NOT_SELECTED}[/dim]", "", "", "", "")
        t.add_row("[b]total[/b]", "", f"{len(self.converted)} converted, {len(self.skipped)} skipped", "",
                  f"{self.params_before:,}", f"{self.params_after:,}", "")
        return t

    def __rich__(self) -> Any:  # rich.print(plan), and notebooks with rich's IPython extension
        return self.table()

    def __repr__(self) -> str:  # a REPL / notebook shows the table
        return str(self)

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=180, record=True, file=_NullIO())
        console.print(self.table())
        for w in self.warnings:
            console.print(f"warning: {w}")
        return console.export_text()


_NOT_SELECTED = "not selected by include/exclude"
_MAX_UNSELECTED_ROWS = 8  # more are summarised in one row (the names stay in Plan.skipped)


class _NullIO:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


Pattern = str | type


@dataclass(frozen=True)
class Selection:
    """Validated ``include`` / ``exclude`` patterns (glob over qualified names, or classes)."""

    include: tuple[Pattern, ...] | None
    exclude: tuple[Pattern, ...]

    @staticmethod
    def of(include: Any, exclude: Any) -> "Selection":
        return Selection(None if include is None else _patterns("include", include), _patterns("exclude", exclude or ()))

    def selected(self, name: str, module: nn.Module, ancestors: Sequence[tuple[str, nn.Module]]) -> bool:
        chain = [*ancestors, (name, module)]
        if any(_match(p, n, m) for p in self.exclude for n, m in chain):
            return False
        if self.include is None:
            return True
        return any(_match(p, n, m) for p in self.include for n, m in chain)


@dataclass(frozen=True)
class PerModule:
    """A setting given per module (PEFT's ``rank_pattern`` convention): ``{pattern: setting}``.

    Patterns are what ``include`` takes: globs over the *original* qualified module names
    (``model.named_modules()``) or ``nn.Module`` classes. The most specific match wins: the
    module's own name before its parent's, and so up to the root; among patterns matching
    the same name, the first in the dict. ``"*"`` is the default (whatever its position);
    without it, the library default. A dict with a ``"name"`` key is one setting's spec (as
    ``bf.save`` records it), not patterns.
    """

    kind: str
    patterns: tuple[tuple[Pattern, Any], ...]
    default: Any

    @staticmethod
    def of(kind: str, value: Any, resolve: Callable[[Any], Any]) -> "PerModule":
        """``resolve(setting)`` validates one setting; ``resolve(None)`` gives the default."""
        if not is_pattern_dict(value):
            return PerModule(kind, (), resolve(value))
        default, patterns = None, []
        for key, setting in value.items():
            try:
                resolved = resolve(setting)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{kind}[{key!r}]: {exc}") from None
            if key == "*":
                default = resolved
            elif isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module)):
                patterns.append((key, resolved))
            else:
                raise TypeError(f"{kind} keys must be glob strings over module names, nn.Module classes or '*'; "
                                f"got {key!r}")
        return PerModule(kind, tuple(patterns), resolve(None) if default is None else default)

    def get(self, name: str, module: nn.Module, ancestors: Sequence[tuple[str, nn.Module]]) -> Any:
        for n, m in [(name, module), *reversed(ancestors)]:
            for pat, setting in self.patterns:
                if _match(pat, n, m):
                    return setting
        return self.default

    def spec(self, one: Callable[[Any], Any]) -> Any:
        """JSON form: ``one(default)`` when uniform, else ``{pattern: one(setting), ..., "*": ...}``."""
        if not self.patterns:
            return one(self.default)
        return {**{_pattern_text(p): one(v) for p, v in self.patterns}, "*": one(self.default)}


def is_pattern_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and "name" not in value


def _pattern_text(p: Pattern) -> str:
    return p if isinstance(p, str) else f"class:{p.__module__}:{p.__qualname__}"


def new_parameters(model: nn.Module, new_modules: Any = None) -> set[int]:
    """``id()`` of every parameter that was newly initialised rather than loaded.

    ``new_modules=None``: what the framework recorded. Hugging Face ``from_pretrained``
    (transformers >= 5) flags every tensor it loaded (or tied) with ``_is_hf_initialized``;
    a model holding such flags has its unflagged parameters (a new classifier head, modules
    added after loading such as LoRA adapters) counted as new. Otherwise: a list of module
    globs / classes / parameter names (e.g. the ``missing_keys`` of
    ``from_pretrained(..., output_loading_info=True)``); ``[]`` for none.
    """
    params = list(model.named_parameters(remove_duplicate=False))
    if new_modules is None:
        if not any(getattr(p, "_is_hf_initialized", False) is True for _, p in params):
            return set()
        return {id(p) for _, p in params if getattr(p, "_is_hf_initialized", False) is not True}
    entries = _patterns("new_modules", new_modules)
    modules = dict(model.named_modules(remove_duplicate=False))
    found: set[int] = set()
    for entry in entries:
        hit = False
        for pname, p in params:
            owner = pname.rpartition(".")[0]
            chain = [owner] + [owner.rsplit(".", k)[0] for k in range(1, owner.count(".") + 1)] if owner else [""]
            if (isinstance(entry, str) and fnmatch.fnmatchcase(pname, entry)) or \
                    any(_match(entry, n, modules[n]) for n in chain if n in modules):
                found.add(id(p))
                hit = True
        if not hit:
            raise ValueError(f"new_modules entry {_show(entry)!r} matches no module or parameter of the model "
                             "(globs over model.named_modules() / named_parameters() names, or classes)")
    return found


def _patterns(kind: str, value: Any) -> tuple[Pattern, ...]:
    items = [value] if isinstance(value, (str, type)) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{kind} must be a glob string, an nn.Module class, or a list of them; "
                        f"got {type(value).__name__}") from None
    for p in items:
        if isinstance(p, str):
            continue
        if isinstance(p, type) and issubclass(p, nn.Module):
            continue
        raise TypeError(f"{kind} entries must be glob strings over module names or nn.Module classes; got {p!r}")
    return tuple(items)


def _match(pattern: Pattern, name: str, module: nn.Module) -> bool:
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern)
    return isinstance(module, pattern)


def _tree(model: nn.Module) -> Iterable[tuple[str, nn.Module, list[tuple[str, nn.Module]]]]:
    """(name, module, ancestors) for each distinct module, parents first."""
    seen: set[int] = set()

    def walk(prefix: str, mod: nn.Module, ancestors: list[tuple[str, nn.Module]]):
        if id(mod) in seen:
            return
        seen.add(id(mod))
        yield prefix, mod, ancestors
        for child_name, child in mod._modules.items():
            if child is not None:
                yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child,
                                [*ancestors, (prefix, mod)])

    yield from walk("", model, [])


def _own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(k, p) for k, p in module._parameters.items() if isinstance(p, nn.Parameter)]


def _fx_graph(model: nn.Module, mapping: dict) -> tuple[dict[str, int] | None, set[str], str]:
    """Call counts per module and raw parameters read by the forward, from a torch.fx trace."""
    from torch import fx

    leaf_types = tuple(mapping) + (_BatchNorm,)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_types) or super().is_leaf_module(m, qualname)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any trace failure means: use the module tree
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, set(), f"torch.fx could not trace the model ({type(exc).__name__}: {first[:120]}); planned from the module tree"
    calls: dict[str, int] = {}
    attrs: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            attrs.add(node.target)
    return calls, attrs, "traced with torch.fx"


def validate_mapping(mapping: Any) -> dict[type[nn.Module], type[VILayer]]:
    if mapping is None:
        return dict(DEFAULT_MAPPING)
    if not isinstance(mapping, dict):
        raise TypeError(f"mapping must be a dict {{nn.Module class: VILayer class}}, got {type(mapping).__name__}")
    for k, v in mapping.items():
        if not (isinstance(k, type) and issubclass(k, nn.Module)):
            raise TypeError(f"mapping keys must be nn.Module classes, got {k!r}")
        if not (isinstance(v, type) and issubclass(v, VILayer)):
            raise TypeError(f"mapping values must be bayesify.nn.VILayer subclasses (e.g. bf.nn.VILinear), got {v!r}")
    return mapping


@dataclass(frozen=True)
class SiteSettings:
    """What one converted module gets: prior, variational family, estimator; ``new``: newly
    initialised (its prior is then centred at zero, see :func:`zero_centred`)."""

    prior: Any
    variational: Any
    estimator: str
    new: bool = False


@dataclass(frozen=True)
class Settings:
    """The per-module settings of one conversion, and the ids of newly initialised parameters."""

    prior: PerModule
    variational: PerModule
    estimator: PerModule
    new: frozenset[int] = frozenset()

    def for_module(self, name: str, module: nn.Module, ancestors: Sequence[tuple[str, nn.Module]],
                   params: Sequence[nn.Parameter]) -> SiteSettings:
        new = any(id(p) in self.new for p in params)
        prior = self.prior.get(name, module, ancestors)
        if new:
            prior = zero_centred(prior)
        return SiteSettings(prior, self.variational.get(name, module, ancestors),
                            self.estimator.get(name, module, ancestors), new)

    def unused_patterns(self, model: nn.Module) -> list[str]:
        out = []
        for per in (self.prior, self.variational, self.estimator):
            for pat, _ in per.patterns:
                if not any(_match(pat, n, m) for n, m, _ in _tree(model)):
                    out.append(f"{per.kind} pattern {_show(pat)!r} matched no module")
        return out


#: Scale of the zero-centred prior that newly initialised weights get in place of a prior
#: centred on their (random) values. Broad, as for a network trained from scratch: an
#: init-sized scale (0.02) lets the KL pin a new head near zero when the data set is small.
NEW_MODULE_PRIOR_SCALE = 1.0


def zero_centred(prior: Any) -> Any:
    """``prior`` with its centre moved from the (random) point weights to 0 and its scale raised
    to at least :data:`NEW_MODULE_PRIOR_SCALE`; priors not centred on the point weights are kept."""
    if getattr(prior, "loc", None) != "pretrained":
        return prior
    fields = {**prior.__dict__, "loc": 0.0}
    if "scale" in fields:
        fields["scale"] = max(float(fields["scale"]), NEW_MODULE_PRIOR_SCALE)
    return type(prior)(**fields)


def build_plan(model: nn.Module, selection: Selection, mapping: dict, other_params: str,
               settings: Settings, trace: bool = True
               ) -> tuple[Plan, list[tuple[str, nn.Module, SiteSettings]],
                          list[tuple[str, nn.Module, list[str], SiteSettings]]]:
    """The plan, plus the modules to swap and the (module, parameter names) for the general
    rule, each with its settings."""
    if other_params not in OTHER_PARAMS:
        raise ValueError(f"unknown other_params {other_params!r}; valid choices: {', '.join(OTHER_PARAMS)}")
    result = Plan()
    calls, attrs, note = _fx_graph(model, mapping) if trace else (None, set(), "tracing disabled")
    result.traced, result.trace_note = calls is not None, note
    swaps: list[tuple[str, nn.Module, SiteSettings]] = []
    generic: list[tuple[str, nn.Module, list[str], SiteSettings]] = []
    seen_params: set[int] = set()
    matched_any = False
    swapped_subtrees: list[str] = []
    for name, module, ancestors in _tree(model):
        if any(name.startswith(s + ".") for s in swapped_subtrees):
            continue  # inside a swapped layer (a mapped layer owns its whole subtree)
        own = _own_params(module)
        tname = type(module).__name__
        selected = selection.selected(name, module, ancestors)
        if isinstance(module, VILayer) or getattr(module, "_vi_sites", None):
            result.skipped.append(SkipEntry(name, tname, "already Bayesian"))
            continue
        if type(module) in mapping:
            if not selected:
                result.skipped.append(SkipEntry(name, tname, _NOT_SELECTED))
                continue
            matched_any = True
            params = [p for p in module.parameters() if id(p) not in seen_params]
            n = sum(p.numel() for p in params)
            seen_params.update(id(p) for p in module.parameters())
            site = settings.for_module(name, module, ancestors, params)
            if site.estimator != "reparam" and not site.variational.elementwise_std:
                raise ValueError(f"estimator={site.estimator!r} (module {name!r}) needs independent weights with "
                                 f"elementwise stds; {site.variational!r} has none: use estimator='reparam'")
            if params and not any(site.variational.covers(p) for p in params):
                result.skipped.append(SkipEntry(name, tname, _uncovered(site.variational)))
                continue
            result.converted.append(PlanEntry(name, tname, mapping[type(module)].__name__, n,
                                              _with_vparams(params, site.variational),
                                              None if calls is None else calls.get(name, 0),
                                              _prior_text(site.prior, site.variational), site.new))
            swaps.append((name, module, site))
            swapped_subtrees.append(name)
            continue
        if not own:
            continue
        if not selected:
            result.skipped.append(SkipEntry(name, tname, _NOT_SELECTED))
            continue
        matched_any = True
        if isinstance(module, _BatchNorm):
            result.skipped.append(SkipEntry(name, tname, "BatchNorm stays deterministic (batch statistics)"))
            continue
        if other_params == "deterministic":
            result.skipped.append(SkipEntry(name, tname, "other parameters left deterministic (other_params)"))
            continue
        names = [k for k, p in own if p.is_floating_point() and id(p) not in seen_params]
        if not names:
            continue
        n = sum(module._parameters[k].numel() for k in names)  # type: ignore[union-attr]
        seen_params.update(id(module._parameters[k]) for k in names)
        site = settings.for_module(name, module, ancestors, [module._parameters[k] for k in names])  # type: ignore[misc]
        if not any(site.variational.covers(module._parameters[k]) for k in names):
            result.skipped.append(SkipEntry(name, tname, _uncovered(site.variational)))
            continue
        used = ""
        if calls is not None:
            read = [k for k in names if (f"{name}.{k}" if name else k) in attrs]
            used = f" (read directly: {', '.join(read)})" if read else ""
        result.converted.append(PlanEntry(name, tname, f"general rule: {', '.join(names)}{used}", n,
                                          _with_vparams([module._parameters[k] for k in names], site.variational),
                                          None if calls is None else calls.get(name, 0),
                                          _prior_text(site.prior, site.variational), site.new))
        generic.append((name, module, names, site))
    if selection.include is not None and not matched_any:
        names = [n for n, _, _ in _tree(model) if n][:12]
        raise ValueError(f"include={list(map(_show, selection.include))} matches no module with parameters; "
                         f"module names look like: {', '.join(names)} (globs over model.named_modules() "
                         "names, or nn.Module classes)")
    for pat in selection.exclude:
        if not any(_match(pat, n, m) for n, m, _ in _tree(model)):
            result.warnings.append(f"exclude pattern {_show(pat)!r} matched no module")
    result.warnings.extend(settings.unused_patterns(model))
    return result, swaps, generic


def _uncovered(variational: Any) -> str:
    return f"{variational.name} covers only tensors of >= 2 dims: stays deterministic"


def _prior_text(prior: Any, variational: Any = None) -> str:
    """``Normal(pretrained, 0.03)``: the prior's class and field values, short (a family with a
    prior of its own, the rank-1 family's over its factors, says so instead)."""
    if variational is not None and not variational.weight_prior:
        return f"factors N(1, {variational.prior_std:g}^2)" if hasattr(variational, "prior_std") else "the family's"
    values = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in prior.__dict__.values())
    return f"{type(prior).__name__}({values})"


def _show(p: Pattern) -> str:
    return p if isinstance(p, str) else p.__name__


def default_prior() -> Any:
    """Normal centred on the pretrained weights, scale 0.03 (the recipe in docs/uncertainty.md).

    Where the data do not pin a weight, the ELBO moves its spread towards the prior scale,
    so this is the noise level a long fine-tune converges to; 0.03 is about half the typical
    weight of a small CNN or a MiniLM block. Newly initialised weights (a new head) get a
    zero-centred prior instead (:func:`zero_centred`).
    """
    from .priors import Normal

    return Normal(loc="pretrained", scale=0.03)


def default_variational() -> Any:
    """Mean-field Normal, initial std 10 % of each pretrained weight's magnitude.

    Relative, so one setting fits every weight scale; 0.1 leaves a converted model's
    predictions nearly unchanged at step 0 (larger spreads hurt deep transformers) while a
    short fine-tune has spreads large enough to matter (``1e-3`` barely moves from the
    point model). See the recipe in docs/uncertainty.md.
    """
    from .variational import MeanFieldNormal

    return MeanFieldNormal(init_std=0.1, relative=True)


def settings_of(model: nn.Module, prior: Any = None, variational: Any = None, estimator: Any = "reparam",
                new_modules: Any = None) -> Settings:
    """Validate ``bayesify``'s per-module settings (each a setting or ``{pattern: setting}``).

    A shortcut string names only what differs from the default: ``"normal:scale=0.1"`` keeps
    the default's ``loc="pretrained"``.
    """
    from .priors import get_prior
    from .sites import validate_estimator
    from .variational import get_variational

    dp, dq = default_prior(), default_variational()
    return Settings(
        PerModule.of("prior", prior, lambda v: get_prior(v, dp)),
        PerModule.of("variational", variational, lambda v: get_variational(v, dq)),
        PerModule.of("estimator", estimator, lambda v: validate_estimator("reparam" if v is None else v)),
        frozenset(new_parameters(model, new_modules)),
    )


def plan(model: nn.Module, include: Any = None, exclude: Any = None, mapping: Any = None,
         other_params: str = "bayesian", trace: bool = True, variational: Any = None, *,
         prior: Any = None, estimator: Any = "reparam", new_modules: Any = None) -> Plan:
    """What ``bayesify(model, ...)`` would convert, with each module's prior; changes nothing.

    In a notebook or REPL the returned plan shows itself as a table; in a script,
    ``print(bf.plan(model))`` (or ``rich.print`` it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan() expects a torch.nn.Module, got {type(model).__name__}")
    settings = settings_of(model, prior, variational, estimator, new_modules)
    p, _, _ = build_plan(model, Selection.of(include, exclude), validate_mapping(mapping), other_params,
                         settings, trace)
    for w in p.warnings:
        warnings.warn(w, UserWarning, stacklevel=2)
    return p


def _with_vparams(params: list[Any], q: Any) -> int:
    """Parameter count after conversion: each tensor plus the variational parameters ``q`` gives it."""
    return sum(p.numel() + (q.extra_numel(tuple(p.shape)) if q.covers(p) else 0) for p in params)
