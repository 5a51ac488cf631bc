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
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .nn import DEFAULT_MAPPING, VILayer

__all__ = ["plan", "Plan", "PlanEntry", "SkipEntry", "Selection"]

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
        for col in ("module", "type", "becomes", "params", "params after", "fx calls"):
            t.add_column(col, justify="right" if col in ("params", "params after", "fx calls") else "left",
                         overflow="fold")
        for e in self.converted:
            t.add_row(e.name or "(root)", e.type, e.becomes, f"{e.params_before:,}", f"{e.params_after:,}",
                      "-" if e.calls is None else str(e.calls))
        for s in self.skipped:
            t.add_row(s.name or "(root)", s.type, f"[dim]skipped: {s.reason}[/dim]", "", "", "")
        t.add_row("[b]total[/b]", "", f"{len(self.converted)} converted, {len(self.skipped)} skipped",
                  f"{self.params_before:,}", f"{self.params_after:,}", "")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=_NullIO())
        console.print(self.table())
        for w in self.warnings:
            console.print(f"warning: {w}")
        return console.export_text()


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


def build_plan(model: nn.Module, selection: Selection, mapping: dict, other_params: str,
               vparams_per_param: int, trace: bool = True) -> tuple[Plan, list[tuple[str, nn.Module]],
                                                                        list[tuple[str, nn.Module, list[str]]]]:
    """The plan, plus the modules to swap and the (module, parameter names) for the general rule."""
    if other_params not in OTHER_PARAMS:
        raise ValueError(f"unknown other_params {other_params!r}; valid choices: {', '.join(OTHER_PARAMS)}")
    result = Plan()
    calls, attrs, note = _fx_graph(model, mapping) if trace else (None, set(), "tracing disabled")
    result.traced, result.trace_note = calls is not None, note
    swaps: list[tuple[str, nn.Module]] = []
    generic: list[tuple[str, nn.Module, list[str]]] = []
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
                result.skipped.append(SkipEntry(name, tname, "not selected by include/exclude"))
                continue
            matched_any = True
            n = sum(p.numel() for p in module.parameters() if id(p) not in seen_params)
            seen_params.update(id(p) for p in module.parameters())
            result.converted.append(PlanEntry(name, tname, mapping[type(module)].__name__, n,
                                              n * (1 + vparams_per_param),
                                              None if calls is None else calls.get(name, 0)))
            swaps.append((name, module))
            swapped_subtrees.append(name)
            continue
        if not own:
            continue
        if not selected:
            result.skipped.append(SkipEntry(name, tname, "not selected by include/exclude"))
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
        used = ""
        if calls is not None:
            read = [k for k in names if (f"{name}.{k}" if name else k) in attrs]
            used = f" (read directly: {', '.join(read)})" if read else ""
        result.converted.append(PlanEntry(name, tname, f"general rule: {', '.join(names)}{used}", n,
                                          n * (1 + vparams_per_param),
                                          None if calls is None else calls.get(name, 0)))
        generic.append((name, module, names))
    if selection.include is not None and not matched_any:
        names = [n for n, _, _ in _tree(model) if n][:12]
        raise ValueError(f"include={list(map(_show, selection.include))} matches no module with parameters; "
                         f"module names look like: {', '.join(names)} (globs over model.named_modules() "
                         "names, or nn.Module classes)")
    for pat in selection.exclude:
        if not any(_match(pat, n, m) for n, m, _ in _tree(model)):
            result.warnings.append(f"exclude pattern {_show(pat)!r} matched no module")
    return result, swaps, generic


def _show(p: Pattern) -> str:
    return p if isinstance(p, str) else p.__name__


def plan(model: nn.Module, include: Any = None, exclude: Any = None, mapping: Any = None,
         other_params: str = "bayesian", trace: bool = True, variational: Any = None) -> Plan:
    """What ``bayesify(model, ...)`` would convert; changes nothing. ``print()`` it for a table."""
    from .variational import get_variational

    if not isinstance(model, nn.Module):
        raise TypeError(f"plan() expects a torch.nn.Module, got {type(model).__name__}")
    q = get_variational(variational)
    p, _, _ = build_plan(model, Selection.of(include, exclude), validate_mapping(mapping), other_params,
                         _vparams_per_param(q), trace)
    for w in p.warnings:
        warnings.warn(w, UserWarning, stacklevel=2)
    return p


def _vparams_per_param(q: Any) -> int:
    return len(q.init(torch.zeros(1)))
