"""How a saved architecture is rebuilt, and what a file may import to do it.

A *recipe* (recorded by :func:`bayesify.save` and ``bf.bayesify(..., arch=...)``) names the
code that rebuilds the point architecture:

``{"kind": "callable", "target": "torchvision.models:resnet18", "kwargs": {...}}``
    an ``nn.Module`` class, or a factory function annotated to return one, called with
    JSON keyword arguments;
``{"kind": "transformers", "target": "transformers:BertModel", "config": {...}}``
    a Hugging Face model class rebuilt from its ``config.to_dict()``;
``{"kind": "export"}``
    a ``torch.export`` program embedded in the file (checked by :mod:`bayesify._pt2`);
``{"kind": "torch.nn", "tree": {...}}``
    a model made of ``torch.nn`` containers (``Sequential``, ``ModuleList``, ``ModuleDict``)
    and ``torch.nn`` layers: each layer's class name (looked up in ``torch.nn``, nothing is
    imported) and its constructor arguments read back from its attributes. Recorded only when
    the rebuilt tree repeats the model's own, module by module (class and ``repr``).

**What a file may import.** Importing a module runs its code, so a ``"module:callable"``
read from a file is checked *before* anything is imported (:func:`check_importable`).
Without ``trust_code`` it is allowed only when

- the module is already imported (``sys.modules``: nothing runs), or
- its top-level package is one of :data:`TRUSTED_PACKAGES` (torch, torchvision,
  transformers, timm, ...) and resolves, without being imported, to an installed location:
  not the current directory nor the running script's directory, where a planted
  ``torchvision.py`` would shadow it;

and never when a part of the module name is private (``_internal``) or a dunder such as
``__main__`` (importing ``pkg.__main__`` runs that package's command line), unless it is
already imported. The callable itself must be an
``nn.Module`` class or a function annotated to return one, never a standard-library one.
A ``"module:callable"`` the user passes (``arch=``, ``--arch``) is the user's own choice
and is imported as given.

Example::

    >>> recipe, _ = arch_recipe(None, "torchvision.models:resnet18", {"num_classes": 10})
    >>> build_arch(recipe)  # a ResNet-18 with 10 classes
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io as _io
import json
import os
import re
import sys
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._pt2 import _first_line, _Untrusted, check_pt2, load_exported_program

__all__ = ["arch_recipe", "build_arch", "resolve_callable", "check_importable", "class_pattern", "exported_module",
           "TRUSTED_PACKAGES"]

#: Top-level packages whose modules a file may name without ``trust_code`` (model libraries
#: whose import runs nothing but definitions).
TRUSTED_PACKAGES = frozenset({
    "torch", "torchvision", "torchaudio", "transformers", "timm", "bayesify", "diffusers",
    "sentence_transformers", "open_clip", "peft",
})


class UntrustedImport(_Untrusted):
    """A recipe names a module that loading would have to import without the user's trust."""


# -- architecture recipes ------------------------------------------------------------------------------
def arch_recipe(model: nn.Module | None, arch: Any = None, arch_kwargs: dict[str, Any] | None = None,
                embed: bool = True) -> tuple[dict[str, Any], bytes | None]:
    """The recipe that rebuilds ``model``'s architecture, and the embedded program bytes (or None).

    ``embed=False`` (for ``bf.bayesify(..., arch=...)``, which records JSON only) refuses programs.
    """
    kwargs = _check_kwargs(arch_kwargs)
    if _is_exported_program(arch):
        if not embed:
            raise ValueError("bayesify(arch=...) records a 'module:callable' recipe; pass a torch.export "
                             "program to bf.save(bnn, path, arch=program) instead")
        if arch_kwargs:
            raise ValueError("arch_kwargs cannot be used with a torch.export program")
        buf = _io.BytesIO()
        torch.export.save(arch, buf)
        data = buf.getvalue()
        try:
            check_pt2(data)
        except _Untrusted as exc:
            raise ValueError(f"this torch.export program cannot be stored loadably without unpickling "
                             f"({exc}); pass arch='module:callable' instead") from None
        return {"kind": "export"}, data
    if arch is not None:
        target = arch if isinstance(arch, str) else _target_of(arch)
        resolve_callable(target, trust_code=True)  # the user's own: fail now, not when loading
        return {"kind": "callable", "target": target, "kwargs": kwargs}, None
    if model is None:
        raise ValueError("no architecture given: pass arch='module:callable'")
    hf = _peft_recipe(model) or _hf_recipe(model)
    if hf is not None:
        if arch_kwargs:
            raise ValueError("arch_kwargs cannot be used with a Hugging Face model (its config is recorded)")
        return hf, None
    cls = type(model)
    hint = ("pass arch='module:callable' naming the function or class that builds it, e.g. "
            "arch='torchvision.models:resnet18', arch_kwargs={'num_classes': 10}")
    if isinstance(model, _CONTAINERS) and type(model) in _CONTAINERS:
        if arch_kwargs:
            raise ValueError(f"arch_kwargs cannot be used with a torch.nn.{cls.__name__}: its layers are recorded")
        try:
            return {"kind": "torch.nn", "tree": nn_tree(model)}, None
        except ValueError as exc:
            raise ValueError(f"cannot tell how to rebuild this {cls.__name__}: {exc}; {hint}") from None
    if isinstance(model, torch.fx.GraphModule):
        raise ValueError(f"cannot tell how to rebuild a {cls.__name__} (a torch.fx / torch.export graph); "
                         f"pass the ExportedProgram as arch=, or {hint}")
    target = _target_of(cls)
    try:
        resolve_callable(target, trust_code=True)  # the model's own class: already imported
    except ValueError as exc:
        raise ValueError(f"cannot tell how to rebuild {cls.__name__}: {exc}; {hint}") from None
    if not kwargs and not _constructible_without_args(cls):
        raise ValueError(f"cannot tell how to rebuild {cls.__name__}: its constructor needs arguments; "
                         f"pass arch_kwargs={{...}} (JSON), or {hint}")
    if cls.__module__ == "__main__":
        warnings.warn(f"{cls.__name__} is defined in __main__: the file loads only where __main__ "
                      "defines it too; move the class into a module or pass arch='module:callable'",
                      UserWarning, stacklevel=3)
    return {"kind": "callable", "target": target, "kwargs": kwargs}, None


def build_arch(recipe: dict[str, Any], where: str = "recipe", program: Tensor | bytes | None = None,
               override: str | Callable[..., nn.Module] | None = None, trust_code: bool = False) -> nn.Module:
    """The point model a recipe describes (``ValueError`` naming ``where`` on failure).

    ``override`` (the user's ``arch=``) replaces the recipe's callable and is trusted as
    given; ``trust_code=True`` lets the recipe import modules outside the safe rule.
    """
    kind = recipe.get("kind") if isinstance(recipe, dict) else None
    try:
        if kind == "export" and override is None:
            if program is None:
                raise ValueError("the embedded torch.export program is missing")
            data = program.numpy().tobytes() if isinstance(program, Tensor) else bytes(program)
            model = exported_module(load_exported_program(data))
        elif kind == "transformers" and override is None:
            cls = resolve_callable(recipe["target"], trust_code=trust_code)
            import transformers

            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                raise ValueError(f"{recipe['target']} is not a transformers PreTrainedModel class")
            config = cls.config_class.from_dict(dict(recipe["config"]), **_hf_attn_implementation(recipe))
            model = cls(config)
        elif kind == "peft" and override is None:
            model = _build_peft(recipe, trust_code)
        elif kind == "torch.nn" and override is None:
            model = build_nn_tree(recipe.get("tree"))
        elif kind == "callable" or override is not None:
            fn = override if callable(override) else resolve_callable(
                override or recipe["target"], trusted=override is not None, trust_code=trust_code)
            if override is None and fn in _CONTAINERS:
                raise ValueError(f"the file names an empty torch.nn.{fn.__name__} (older bayesify versions did not "
                                 "record a container's layers); pass arch= to bf.load (--arch to the CLI): a "
                                 "function that builds the model")
            model = fn(**_check_kwargs(recipe.get("kwargs")))
        else:
            raise ValueError(f"unknown architecture recipe {kind!r}")
    except UntrustedImport as exc:
        raise UntrustedImport(f"{where}: {exc}") from None
    except _Untrusted as exc:  # an embedded program that would run code or not evaluate cheaply
        raise _Untrusted(f"{where}: cannot rebuild the architecture: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: cannot rebuild the architecture: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user code: report, do not crash
        raise ValueError(f"{where}: cannot rebuild the architecture {_describe(recipe)}: "
                         f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}: {_describe(recipe)} returned a {type(model).__name__}, not an nn.Module")
    return model


def resolve_callable(target: str, trusted: bool = False, *, trust_code: bool = False,
                     where: str | None = None) -> Callable[..., nn.Module]:
    """Import ``"module:qualname"`` and return it.

    ``trusted``: the user's own ``arch=`` argument; imported as given, any callable.
    Otherwise it must be an ``nn.Module`` class or a function annotated to return one, from
    outside the standard library, and its module passes :func:`check_importable` first
    (``trust_code=True`` skips that check: the user trusts the file that names it).
    """
    if not isinstance(target, str):
        raise TypeError(f"arch must be a 'module:callable' string, got {type(target).__name__}")
    mod_name, sep, qual = target.partition(":")
    parts = mod_name.split(".") + qual.split(".")
    if not sep or not all(p.isidentifier() for p in parts) or any(p.startswith("__") for p in qual.split(".")):
        raise ValueError(f"expected 'module:callable' (e.g. 'torchvision.models:resnet18'), got {target!r}")
    if not trusted and mod_name.split(".")[0] in sys.stdlib_module_names:
        raise ValueError(f"{target} is a standard-library callable, not a model architecture")
    if not (trusted or trust_code):
        check_importable(mod_name, target, where)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r} for {target} ({exc})") from None
    for name in qual.split("."):
        if not hasattr(obj, name):
            raise ValueError(f"module {mod_name!r} has no attribute {qual!r} (for {target})")
        obj = getattr(obj, name)
    if trusted:
        if not callable(obj):
            raise ValueError(f"{target} is not callable")
        return obj
    if isinstance(obj, type):
        if issubclass(obj, nn.Module):
            return obj
        raise ValueError(f"{target} is a class but not an nn.Module subclass")
    if inspect.isfunction(obj) and _returns_module(obj):
        return obj
    raise ValueError(f"{target} must be an nn.Module class or a Python function annotated to return one "
                     "(def build(...) -> nn.Module); other callables are refused so that a file cannot "
                     "make load() call arbitrary code")


def check_importable(mod_name: str, target: str | None = None, where: str | None = None) -> None:
    """Raise :class:`UntrustedImport` unless importing ``mod_name`` for a file is allowed
    (the rule is in this module's docstring). Imports nothing it has not allowed: a
    parent package is imported only to locate a submodule of a trusted package."""
    target = target or mod_name
    if mod_name in sys.modules:  # already imported: taking an attribute runs no module code
        return
    parts = mod_name.split(".")
    hint = (f"import it yourself before loading (import {mod_name}) or pass trust_code=True "
            "(command line: --trust-code), only if you trust the file")
    if any(p.startswith("__") for p in parts):
        raise UntrustedImport(f"refusing to import {mod_name!r} (named by the file for {target}): a "
                              f"{parts[-1] if parts[-1].startswith('__') else 'dunder'} module runs code when "
                              "imported; " + hint)
    if any(p.startswith("_") for p in parts):  # private modules: test harnesses, entry points, internals
        raise UntrustedImport(f"refusing to import the private module {mod_name!r} named by the file (for "
                              f"{target}); " + hint)
    top = parts[0]
    if top not in TRUSTED_PACKAGES:
        raise UntrustedImport(f"refusing to import module {mod_name!r} named by the file (for {target}): it "
                              f"is not imported yet and not in a trusted model package "
                              f"({', '.join(sorted(TRUSTED_PACKAGES))}); " + hint)
    if top not in sys.modules:
        try:
            spec = importlib.util.find_spec(top)  # locates without executing the module
        except (ImportError, ValueError) as exc:
            raise ValueError(f"cannot import module {mod_name!r} for {target} ({exc})") from None
        if spec is None:
            raise ValueError(f"cannot import module {mod_name!r} for {target} (no module named {top!r})")
        home = _search_root(spec)
        if home is not None and home in _untrusted_dirs():
            raise UntrustedImport(f"refusing to import {top!r} (for {target}) from {home}: a module of that name "
                                  "in the current or the script's directory shadows the installed package; " + hint)


def _search_root(spec: Any) -> str | None:
    """The directory on sys.path that a top-level module was found in."""
    locations = list(spec.submodule_search_locations or [])
    origin = locations[0] if locations else spec.origin
    if not origin or not os.path.isabs(origin):
        return None  # built-in or frozen
    return os.path.realpath(os.path.dirname(origin))


def _untrusted_dirs() -> set[str]:
    """The current directory and the running script's (Python puts them first on sys.path)."""
    dirs = {os.path.realpath(os.getcwd())}
    if sys.path and sys.path[0] not in ("",):
        main = sys.modules.get("__main__")
        script = getattr(main, "__file__", None)
        if script:
            dirs.add(os.path.realpath(os.path.dirname(os.path.abspath(script))))
    return dirs


# -- torch.export programs (the .pt2 safety checks are in bayesify._pt2) ------------------------------
def exported_module(ep: Any) -> nn.Module:
    """``ep.module()`` with ordinary ``train()`` / ``eval()``.

    ``ExportedProgram.module()`` replaces both with methods that raise, because the graph's
    dropout / BatchNorm behaviour was fixed when it was exported. bayesify needs the mode
    switch for its own sampling (log-probabilities in training mode, ``bf.predict`` runs in
    eval mode); the graph keeps computing as exported either way.
    """
    module = ep.module()
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module



# -- helpers ---
def _is_exported_program(x: Any) -> bool:
    export = sys.modules.get("torch.export")
    return export is not None and isinstance(x, export.ExportedProgram)


def _target_of(obj: Any) -> str:
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not qual or "<locals>" in qual:
        raise ValueError(f"{obj!r} is not importable by name (defined inside a function?); "
                         "pass arch='module:callable'")
    return f"{mod}:{qual}"


def _returns_module(fn: Callable) -> bool:
    try:
        ann = inspect.signature(fn, eval_str=True).return_annotation
    except Exception:  # noqa: BLE001 - unresolvable annotation: not provably a model factory
        return False
    return isinstance(ann, type) and issubclass(ann, nn.Module)


def _constructible_without_args(cls: type) -> bool:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())


def _hf_recipe(model: nn.Module) -> dict[str, Any] | None:
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    cls = type(model)
    target = (f"transformers:{cls.__name__}" if getattr(transformers, cls.__name__, None) is cls
              else _target_of(cls))
    config = json.loads(model.config.to_json_string(use_diff=False))
    recipe = {"kind": "transformers", "target": target, "config": config}
    # Construction settings that config.to_dict() leaves out but that change the outputs.
    attn = getattr(model.config, "_attn_implementation", None)
    if attn is not None:
        recipe["attn_implementation"] = attn
    return recipe


def _hf_attn_implementation(recipe: dict[str, Any]) -> dict[str, Any]:
    """``{"attn_implementation": ...}`` for ``from_dict`` from a recipe: only the built-in
    implementations, never a Hub kernel (``"org/repo"``, which would fetch and run code)."""
    attn = recipe.get("attn_implementation")
    if attn is None:
        return {}
    values = list(attn.values()) if isinstance(attn, dict) else [attn]
    if not all(v is None or (isinstance(v, str) and re.fullmatch(r"[a-z0-9_|]+", v)) for v in values):
        raise ValueError(f"attn_implementation must name a built-in attention (e.g. 'eager', 'sdpa'), got {attn!r}")
    return {"attn_implementation": attn}


def _peft_recipe(model: nn.Module) -> dict[str, Any] | None:
    """A PEFT model (e.g. LoRA adapters): the base model's Hugging Face recipe and the adapters' configs."""
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(model, peft.PeftModel):
        return None
    base = _hf_recipe(model.get_base_model())
    if base is None:
        return None
    adapters = {name: json.loads(json.dumps(cfg.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
                for name, cfg in model.peft_config.items()}
    return {"kind": "peft", "base": base, "adapters": adapters, "active": model.active_adapter}


def _build_peft(recipe: dict[str, Any], trust_code: bool) -> nn.Module:
    """Rebuild a PEFT model: the base model from its recipe, then its adapters (no Hub access)."""
    import peft

    base = recipe.get("base")
    adapters = recipe.get("adapters")
    if not isinstance(base, dict) or base.get("kind") != "transformers" or not isinstance(adapters, dict) or not adapters:
        raise ValueError("a 'peft' recipe needs a Hugging Face 'base' recipe and at least one adapter config")
    model = None
    for name, cfg in adapters.items():
        if not isinstance(cfg, dict) or cfg.get("megatron_config") is not None:
            raise ValueError(f"adapter {name!r}: expected a plain PEFT config (no megatron_config)")
        config = peft.PeftConfig.from_peft_type(**{**cfg, "megatron_core": "megatron.core"})
        if model is None:
            model = peft.get_peft_model(build_arch(base, trust_code=trust_code), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    if recipe.get("active") in adapters:
        model.set_adapter(recipe["active"])
    return model


def _check_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"arch_kwargs must be a dict with string keys (JSON object), got {kwargs!r}")
    try:
        text = json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"arch_kwargs must be JSON-serialisable ({exc})") from None
    if '"trust_remote_code"' in text:  # a constructor must not fetch and run code named by a file
        raise ValueError("arch_kwargs may not contain trust_remote_code")
    return dict(kwargs)


def class_pattern(p: Any, trust_code: bool = False) -> Any:
    """A recorded include / exclude pattern: a glob, or ``"class:module:qualname"`` (resolved
    under the same import rule as the recipe)."""
    if not isinstance(p, str):
        raise TypeError(f"an include / exclude pattern is not a string: {p!r}")
    if p.startswith("class:"):
        _, mod, qual = p.split(":", 2) if p.count(":") >= 2 else (p, "", "")
        return resolve_callable(f"{mod}:{qual}", trust_code=trust_code)
    return p


def _describe(recipe: Any) -> str:
    if not isinstance(recipe, dict):
        return repr(recipe)
    if recipe.get("kind") == "torch.nn":
        tree = recipe.get("tree")
        return f"torch.nn.{tree.get('class') if isinstance(tree, dict) else '?'} of torch.nn layers"
    if recipe.get("kind") == "export":
        return "embedded torch.export program"
    if recipe.get("kind") == "peft":
        return f"PEFT adapters on {_describe(recipe.get('base'))}"
    return str(recipe.get("target"))


# -- torch.nn trees ---------------------------------------------------------------------------------------
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: The most parameters and buffers (elements) a torch.nn tree read from a file may allocate.
NN_TREE_MAX_ELEMENTS = 1 << 31


def nn_tree(model: nn.Module) -> dict[str, Any]:
    """The JSON tree that rebuilds ``model`` (torch.nn containers of torch.nn layers; a converted
    layer counts as its point layer), checked by rebuilding it: ``ValueError`` naming the first
    module that cannot be recorded or does not come back the same."""
    tree = _nn_node(model, "the model")
    rebuilt = build_nn_tree(tree)
    def key(n: str, m: nn.Module) -> tuple[str, type, str]:  # a container's repr repeats its children's
        return n, type(m), "" if isinstance(m, _CONTAINERS) else repr(m)

    want = [key(n, m) for n, m in _point_modules(model)]
    got = [key(n, m) for n, m in rebuilt.named_modules()]
    if want != got:
        bad = next((w for w, g in zip(want, got) if w != g), want[len(got)] if len(want) > len(got) else got[-1])
        raise ValueError(f"module {bad[0] or '(root)'!r} ({bad[1].__name__}) does not rebuild from its attributes")
    return tree


def _point(m: nn.Module) -> nn.Module:
    to_point = getattr(m, "to_point", None)  # a converted layer: its point layer (nn.Linear, ...)
    return to_point() if callable(to_point) and not _is_torch_nn(type(m)) else m


def _point_modules(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    m = _point(model)
    out = [(prefix, m)]
    if isinstance(m, _CONTAINERS):
        for name, child in model.named_children():
            out += _point_modules(child, f"{prefix}.{name}" if prefix else name)
    else:
        out += [(f"{prefix}.{n}" if prefix else n, c) for n, c in m.named_modules() if n]
    return out


def _is_torch_nn(cls: type) -> bool:
    return getattr(nn, cls.__name__, None) is cls


def _nn_node(model: nn.Module, where: str) -> dict[str, Any]:
    m = _point(model)
    cls = type(m)
    if not _is_torch_nn(cls):
        raise ValueError(f"{where} is a {cls.__module__}.{cls.__qualname__}, not a torch.nn layer")
    if isinstance(m, _CONTAINERS):
        return {"class": cls.__name__,
                "children": [[n, _nn_node(c, f"{where}[{n!r}]" if where != "the model" else repr(n))]
                             for n, c in model.named_children()]}
    if next(m.children(), None) is not None:
        raise ValueError(f"{where} ({cls.__name__}) has submodules of its own")
    args: dict[str, Any] = {}
    for p in inspect.signature(cls).parameters.values():
        if p.name in ("device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(m, p.name):
            if p.default is p.empty:
                raise ValueError(f"{where} ({cls.__name__}) does not keep its argument {p.name!r}")
            continue
        value = getattr(m, p.name)
        if isinstance(value, Tensor) or (value is None and p.name == "bias"):
            value = value is not None  # bias=True / False
        args[p.name] = _json_arg(value, f"{where} ({cls.__name__}) argument {p.name!r}")
    return {"class": cls.__name__, "args": args}


def _json_arg(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_json_arg(v, where) for v in value]
    raise ValueError(f"{where} is a {type(value).__name__}, not JSON")


def build_nn_tree(tree: Any, budget: list[int] | None = None) -> nn.Module:
    """The model a ``torch.nn`` tree describes: classes only from ``torch.nn`` (nothing imported),
    JSON arguments, at most :data:`NN_TREE_MAX_ELEMENTS` parameter and buffer elements."""
    budget = [NN_TREE_MAX_ELEMENTS] if budget is None else budget
    if not isinstance(tree, dict) or not isinstance(tree.get("class"), str):
        raise ValueError(f"a torch.nn tree node must be {{'class': name, ...}}, got {type(tree).__name__}")
    cls = getattr(nn, tree["class"], None) if tree["class"].isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"torch.nn has no module class {tree['class']!r}")
    if cls in _CONTAINERS:
        kids = tree.get("children")
        if not isinstance(kids, list) or not all(isinstance(k, list) and len(k) == 2 and isinstance(k[0], str)
                                                 for k in kids):
            raise ValueError(f"a {cls.__name__} node needs 'children': [[name, node], ...]")
        built = [(name, build_nn_tree(node, budget)) for name, node in kids]
        if cls is nn.ModuleList:
            return nn.ModuleList([m for _, m in built])
        from collections import OrderedDict

        return cls(OrderedDict(built))
    args = tree.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"a {cls.__name__} node needs 'args': {{...}}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    with torch.device("meta"):  # the size first: a file cannot make us allocate what it does not hold
        probe = cls(**args)
    budget[0] -= sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    if budget[0] < 0:
        raise ValueError(f"the recorded layers hold over {NN_TREE_MAX_ELEMENTS} elements; "
                         "pass arch='module:callable' to load such a model")
    return cls(**args)
