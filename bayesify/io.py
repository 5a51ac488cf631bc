"""Save and load Bayesian models as one portable file, without pickle.

A bayesify file is a `safetensors <https://github.com/huggingface/safetensors>`_ file:

- the tensors are the model's ``state_dict()`` (posterior means, variational parameters,
  prior buffers, BatchNorm statistics); tied tensors are stored once;
- the header's metadata (``"bayesify"``, a JSON document) holds the conversion spec
  (prior, variational family, include / exclude, other_params, estimator), the library
  versions, and a *recipe* that rebuilds the point architecture:

  ``{"kind": "callable", "target": "torchvision.models:resnet18", "kwargs": {...}}``
      an ``nn.Module`` class, or a factory function annotated to return one, called
      with JSON keyword arguments;
  ``{"kind": "transformers", "target": "transformers:BertModel", "config": {...}}``
      a Hugging Face model class rebuilt from its ``config.to_dict()``;
  ``{"kind": "export"}``
      a ``torch.export`` program, embedded in the file as bytes (a ``uint8`` tensor).

:func:`load` rebuilds the point model from the recipe, converts it with the same
settings (``bf.bayesify(model, **spec)``) and loads the tensors with ``strict=True``.
Nothing is unpickled. A recipe names code that is imported and called, so :func:`load`
only calls ``nn.Module`` classes and factory functions annotated to return one (never
a standard-library callable, never with ``trust_remote_code``), and loads embedded
``torch.export`` programs through :func:`load_exported_program`, which refuses the
parts of the ``.pt2`` format that would unpickle or execute code. That is a guard, not
a sandbox: a file chooses which installed model class is built, with its JSON
arguments, so trust a file as much as the packages it names.

Example::

    >>> bf.save(bnn, "resnet.bnn", arch="torchvision.models:resnet18", arch_kwargs={"num_classes": 10})
    >>> bnn2 = bf.load("resnet.bnn", map_location="cpu")
"""

from __future__ import annotations

import importlib
import inspect
import io as _io
import json
import os
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from ._pt2 import _first_line, _Untrusted, check_pt2, load_exported_program

if TYPE_CHECKING:
    from .module import VIModule

__all__ = ["save", "load", "read_spec", "arch_recipe", "build_arch", "load_exported_program", "exported_module",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1
_META_KEY = "bayesify"
_PROGRAM_KEY = "__bayesify__.exported_program"
_PROGRAM_ATTR = "_bayesify_exported_program"  # the embedded program's bytes on a loaded model
_FACTOR_PREFIX = "__bayesify__.posterior_factor."  # covariance factors of "full" Laplace sites


# -- public -----------------------------------------------------------------------------------------
def save(bnn: nn.Module, path: str | os.PathLike, arch: Any = None, arch_kwargs: dict[str, Any] | None = None) -> None:
    """Write ``bnn`` (a :class:`bayesify.BayesianModel` or a hand-written :class:`bayesify.VIModule`)
    to ``path`` as one safetensors file; the write is atomic (a temporary file, then a rename).

    Args:
        arch: how to rebuild the point architecture when it cannot be found out:
            ``"module:callable"`` (e.g. ``"torchvision.models:resnet18"``), an ``nn.Module``
            class or a factory function, or a ``torch.export.ExportedProgram`` (embedded).
            By default: the recipe given to ``bf.bayesify(..., arch=...)``, else the Hugging
            Face class and config, else the model's class when it is importable and
            constructible from ``arch_kwargs`` (default: no arguments).
        arch_kwargs: JSON keyword arguments for ``arch`` (or for the model's class).
    """
    from .convert import BayesianModel
    from .module import VIModule

    if not isinstance(bnn, VIModule):
        raise TypeError(f"save expects a bayesify model (bf.bayesify(...) or a bf.VIModule), "
                        f"got {type(bnn).__name__}; for a point model use torch.save(model.state_dict())")
    if isinstance(bnn, BayesianModel):
        spec = {k: v for k, v in bnn.conversion.items() if k != "arch"}
        _check_conversion(spec)
        recorded = bnn.conversion.get("arch") if arch is None and arch_kwargs is None else None
        if recorded:  # from bayesify(arch=...) or from bf.load
            recipe, program = recorded, getattr(bnn, _PROGRAM_ATTR, None)
            if recipe.get("kind") == "export" and program is None:
                raise ValueError("the recorded recipe is a torch.export program that this model does not carry; "
                                 "pass arch=<ExportedProgram> or arch='module:callable'")
        else:
            recipe, program = arch_recipe(_point_root(bnn.model), arch, arch_kwargs)
        kind = "bayesify"
    else:
        spec = {}
        recipe, program = arch_recipe(bnn, arch, arch_kwargs)
        if recipe["kind"] == "export":
            raise ValueError("a hand-written VIModule cannot be rebuilt from a torch.export program; "
                             "pass arch='module:Class'")
        kind = "module"
    state = bnn.state_dict()
    device = next((str(t.device) for t in state.values()), "cpu")
    tensors, aliases = _flatten_state(state)
    if program is not None:
        tensors[_PROGRAM_KEY] = torch.frombuffer(bytearray(program), dtype=torch.uint8)
    for name, u in (getattr(bnn, "posterior_factors", None) or {}).items():  # bf.laplace, structure "full"
        tensors[_FACTOR_PREFIX + name] = u.detach().contiguous().cpu()
    header = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "conversion": spec,
        "arch": recipe,
        "aliases": aliases,
        "saved_from_device": device,
        "versions": _versions(),
    }
    if getattr(bnn, "predictive", None):  # bf.laplace / bf.calibrate: what bf.predict uses by default
        header["predictive"] = bnn.predictive
    _atomic_write(os.fspath(path), tensors, {"format": "pt", _META_KEY: json.dumps(header, sort_keys=True)})


def load(path: str | os.PathLike, map_location: str | torch.device | None = None, *,
         arch: str | Callable[..., nn.Module] | None = None, mapping: dict | None = None) -> VIModule:
    """Rebuild a model written by :func:`save`: same architecture, conversion and tensors.

    Args:
        map_location: device of the loaded model (default: CPU, whatever the device it was
            saved from).
        arch: override the recorded recipe's callable (``"module:callable"`` or a callable),
            e.g. when the architecture moved to another module. It is called with the
            recorded keyword arguments and trusted as given.
        mapping: the custom ``mapping`` the model was converted with (it cannot be recorded).

    Raises ``ValueError`` naming the file when it is not a bayesify file, is damaged, or
    the recipe does not rebuild the saved model.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    header = read_spec(path)
    device = torch.device(map_location) if map_location is not None else torch.device("cpu")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any read failure means a damaged file
        raise ValueError(f"{path}: damaged bayesify file ({_first_line(exc)})") from None
    program = tensors.pop(_PROGRAM_KEY, None)
    factors = {k[len(_FACTOR_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(_FACTOR_PREFIX)}
    for alias, canonical in header["aliases"].items():
        if canonical not in tensors:
            raise ValueError(f"{path}: damaged bayesify file (alias {alias!r} of missing tensor {canonical!r})")
        tensors[alias] = tensors[canonical]

    recipe = header["arch"]
    point = build_arch(recipe, where=path, program=program, override=arch)
    if header["kind"] == "bayesify":
        model = _reconvert(point, header["conversion"], mapping, path)
        model.conversion["arch"] = recipe  # so that bf.save(bf.load(p), q) needs no arch= again
        if program is not None:
            setattr(model, _PROGRAM_ATTR, program.numpy().tobytes())
    else:
        model = point
    _match_dtypes(model, tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the recorded architecture ({_describe(recipe)}) does not match the saved "
                         f"tensors: {_mismatch(exc)}; pass arch= to load() to rebuild it differently") from None
    _check_ties(model, header["aliases"], path)
    if isinstance(header.get("predictive"), dict):
        model.predictive = header["predictive"]
    if factors:
        model.posterior_factors = {k: v.to(device) for k, v in factors.items()}
    return model.to(device)


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a bayesify file (``ValueError`` naming the file if it is not one)."""
    from safetensors import safe_open

    path = os.fspath(path)
    expected = "expected a bayesify file written by bf.save (a safetensors file with a 'bayesify' header)"
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file ({expected})")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(exc)}); {expected}") from None
    if _META_KEY not in meta:
        raise ValueError(f"{path}: a safetensors file without a 'bayesify' header; {expected}")
    try:
        header = json.loads(meta[_META_KEY])
        version = header["format_version"]
        for key in ("conversion", "arch", "aliases"):
            if not isinstance(header[key], dict):
                raise TypeError(f"{key} is not an object")
        if header["kind"] not in ("bayesify", "module"):
            raise ValueError(f"unknown kind {header['kind']!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: damaged bayesify header ({exc!r})") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: bayesify file format {version!r}, written by bayesify "
                         f"{header.get('versions', {}).get('bayesify', '?')}; this bayesify reads format "
                         f"{FORMAT_VERSION}: upgrade bayesify")
    return header


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
        resolve_callable(target)  # fail now, not when loading
        return {"kind": "callable", "target": target, "kwargs": kwargs}, None
    if model is None:
        raise ValueError("no architecture given: pass arch='module:callable'")
    hf = _hf_recipe(model)
    if hf is not None:
        if arch_kwargs:
            raise ValueError("arch_kwargs cannot be used with a Hugging Face model (its config is recorded)")
        return hf, None
    cls = type(model)
    hint = ("pass arch='module:callable' naming the function or class that builds it, e.g. "
            "arch='torchvision.models:resnet18', arch_kwargs={'num_classes': 10}")
    if isinstance(model, torch.fx.GraphModule):
        raise ValueError(f"cannot tell how to rebuild a {cls.__name__} (a torch.fx / torch.export graph); "
                         f"pass the ExportedProgram as arch=, or {hint}")
    target = _target_of(cls)
    try:
        resolve_callable(target)
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
               override: str | Callable[..., nn.Module] | None = None) -> nn.Module:
    """The point model a recipe describes (``ValueError`` naming ``where`` on failure)."""
    kind = recipe.get("kind") if isinstance(recipe, dict) else None
    try:
        if kind == "export" and override is None:
            if program is None:
                raise ValueError("the embedded torch.export program is missing")
            data = program.numpy().tobytes() if isinstance(program, Tensor) else bytes(program)
            model = exported_module(load_exported_program(data))
        elif kind == "transformers" and override is None:
            cls = resolve_callable(recipe["target"])
            import transformers

            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                raise ValueError(f"{recipe['target']} is not a transformers PreTrainedModel class")
            config = cls.config_class.from_dict(dict(recipe["config"]))
            model = cls(config)
        elif kind == "callable" or override is not None:
            fn = override if callable(override) else resolve_callable(override or recipe["target"],
                                                                      trusted=override is not None)
            model = fn(**_check_kwargs(recipe.get("kwargs")))
        else:
            raise ValueError(f"unknown architecture recipe {kind!r}")
    except ValueError as exc:
        raise ValueError(f"{where}: cannot rebuild the architecture: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user code: report, do not crash
        raise ValueError(f"{where}: cannot rebuild the architecture {_describe(recipe)}: "
                         f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}: {_describe(recipe)} returned a {type(model).__name__}, not an nn.Module")
    return model


def resolve_callable(target: str, trusted: bool = False) -> Callable[..., nn.Module]:
    """Import ``"module:qualname"``; unless ``trusted``, it must be an ``nn.Module`` class or a
    function annotated to return one, from outside the standard library."""
    if not isinstance(target, str):
        raise TypeError(f"arch must be a 'module:callable' string, got {type(target).__name__}")
    mod_name, sep, qual = target.partition(":")
    parts = mod_name.split(".") + qual.split(".")
    if not sep or not all(p.isidentifier() for p in parts) or any(p.startswith("__") for p in qual.split(".")):
        raise ValueError(f"expected 'module:callable' (e.g. 'torchvision.models:resnet18'), got {target!r}")
    if not trusted and mod_name.split(".")[0] in sys.stdlib_module_names:
        raise ValueError(f"{target} is a standard-library callable, not a model architecture")
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


# -- helpers ----------------------------------------------------------------------------------------------
def _point_root(model: nn.Module) -> nn.Module:
    """The converted model's root as its point type (a root that was itself a mapped layer)."""
    from .nn import VILayer

    return model.to_point() if isinstance(model, VILayer) else model


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
    return {"kind": "transformers", "target": target, "config": config}


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


def _check_conversion(spec: dict[str, Any]) -> None:
    """Fail at save time, not at load time, if the spec cannot be rebuilt."""
    from .priors import get_prior
    from .variational import get_variational

    try:
        get_prior(dict(spec["prior"]))
        get_variational(dict(spec["variational"]))
        json.dumps(spec, allow_nan=False)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot save this model portably: its prior / variational family cannot be "
                         f"rebuilt from the recorded spec ({exc}); custom families need a name registered "
                         "in bayesify.priors.PRIORS / bayesify.variational.VARIATIONAL") from None


def _pattern(p: str) -> Any:
    if p.startswith("class:"):
        _, mod, qual = p.split(":", 2)
        cls = resolve_callable(f"{mod}:{qual}")
        return cls
    return p


def _reconvert(point: nn.Module, conv: dict[str, Any], mapping: dict | None, where: str) -> nn.Module:
    from .convert import bayesify

    if conv.get("custom_mapping") and mapping is None:
        raise ValueError(f"{where}: the model was converted with a custom mapping; pass it: "
                         "bf.load(path, mapping={...})")
    try:
        include = conv.get("include")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reported when the model was converted
            return bayesify(point, prior=dict(conv["prior"]), variational=dict(conv["variational"]),
                            include=None if include is None else [_pattern(p) for p in include],
                            exclude=[_pattern(p) for p in conv.get("exclude", [])],
                            other_params=conv.get("other_params", "bayesian"),
                            estimator=conv.get("estimator", "reparam"), mapping=mapping, inplace=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{where}: cannot redo the recorded conversion ({exc})") from None


def _flatten_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """CPU tensors, each stored once: an entry that is the same tensor as an earlier one (tied
    parameters, shared variational state) becomes an alias of the first name. Entries that
    merely overlap another one's memory are copied, since safetensors refuses shared storage."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.device, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        kept[name] = t
    users: dict[tuple, int] = {}
    for t in kept.values():
        if t.numel():
            k = (t.device, t.untyped_storage().data_ptr())
            users[k] = users.get(k, 0) + 1
    out: dict[str, Tensor] = {}
    for name, t in kept.items():
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        alone = not t.numel() or users[(t.device, t.untyped_storage().data_ptr())] == 1
        t = t if whole and alone else t.contiguous().clone()
        out[name] = t.to("cpu")
    return out, aliases


def _match_dtypes(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Give each rebuilt tensor the saved dtype in place (keeps ties and Parameter identity)."""
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        saved = tensors.get(name)
        if saved is not None and saved.dtype != t.dtype:
            t.data = t.data.to(saved.dtype)


def _check_ties(model: nn.Module, aliases: dict[str, str], where: str) -> None:
    state = model.state_dict(keep_vars=True)
    for alias, canonical in aliases.items():
        a, b = state.get(alias), state.get(canonical)
        if a is not None and b is not None and a is not b:
            warnings.warn(f"{where}: {alias} and {canonical} were tied when saved but the rebuilt architecture "
                          "does not tie them (loaded with equal values)", UserWarning, stacklevel=3)
            return


def _atomic_write(path: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; a saved model is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _versions() -> dict[str, str]:
    from . import __version__

    v = {"bayesify": __version__, "torch": torch.__version__}
    tf = sys.modules.get("transformers")
    if tf is not None:
        v["transformers"] = tf.__version__
    return v


def _describe(recipe: Any) -> str:
    if not isinstance(recipe, dict):
        return repr(recipe)
    if recipe.get("kind") == "export":
        return "embedded torch.export program"
    return str(recipe.get("target"))


def _mismatch(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:400] + ("..." if len(text) > 400 else "")
