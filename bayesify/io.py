"""Save and load Bayesian models as one portable file, without pickle.

A bayesify file is a `safetensors <https://github.com/huggingface/safetensors>`_ file:

- the tensors are the model's ``state_dict()`` (posterior means, variational parameters,
  prior buffers, BatchNorm statistics); tied tensors are stored once;
- the header's metadata (``"bayesify"``, a JSON document) holds the conversion spec
  (prior, variational family, include / exclude, other_params, estimator), the library
  versions, and a *recipe* that rebuilds the point architecture (:mod:`bayesify.recipe`):
  a ``"module:callable"`` with JSON arguments, a Hugging Face class and config, or an
  embedded ``torch.export`` program.

:func:`load` rebuilds the point model from the recipe, converts it with the same
settings (``bf.bayesify(model, **spec)``) and loads the tensors with ``strict=True``.
Nothing is unpickled. What a recipe may import and call is decided before anything is
imported (:mod:`bayesify.recipe`: already-imported modules and installed model packages
only, unless ``trust_code=True``); embedded programs load through
:func:`bayesify._pt2.load_exported_program`, which refuses the parts of the ``.pt2`` format
that would unpickle or execute code, and sizes or expressions too large to check cheaply.

:func:`save` writes atomically (a hidden temporary file next to the target, then a
rename), replaces only regular files, and removes the temporary file on an exception or
SIGTERM; ``kill -9`` can leave that hidden ``.NAME.*.tmp`` file behind, never a partial
target.

Example::

    >>> bf.save(bnn, "resnet.bnn", arch="torchvision.models:resnet18", arch_kwargs={"num_classes": 10})
    >>> bnn2 = bf.load("resnet.bnn", map_location="cpu")
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ._pt2 import _first_line, load_exported_program  # noqa: F401 - load_exported_program: public here too
from .convert import BayesianModel, bayesify
from .module import VIModule
from .nn import VILayer
from .recipe import _describe, arch_recipe, build_arch, class_pattern, exported_module  # noqa: F401

__all__ = ["save", "load", "read_spec", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_META_KEY = "bayesify"
_PROGRAM_KEY = "__bayesify__.exported_program"
_PROGRAM_ATTR = "_bayesify_exported_program"  # the embedded program's bytes on a loaded model
_FACTOR_PREFIX = "__bayesify__.posterior_factor."  # covariance factors of "full" Laplace sites


# -- public -----------------------------------------------------------------------------------------
def _fspath(path: Any) -> str:
    """``os.fspath(path)`` as a str, with a message that names what a path may be."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or an os.PathLike (e.g. pathlib.Path), got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must name a file as text, got {type(path).__name__}")
    return path


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
    if not isinstance(bnn, VIModule):
        raise TypeError(f"save expects a bayesify model (bf.bayesify(...) or a bf.VIModule), "
                        f"got {type(bnn).__name__}; for a point model use torch.save(model.state_dict())")
    path = _fspath(path)
    check_target(path)  # before any work: never replace a device, FIFO or directory
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
    meta = [name for name, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save a model whose tensors are on the meta device (no values): {len(meta)} "
                         f"tensor(s), e.g. {meta[0]}; materialise it first (model.to_empty(device='cpu') and "
                         "load_state_dict)")
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
    _atomic_write(path, tensors, {"format": "pt", _META_KEY: json.dumps(header, sort_keys=True)})


def load(path: str | os.PathLike, map_location: str | torch.device | dict | None = None, *,
         arch: str | Callable[..., nn.Module] | None = None, mapping: dict | None = None,
         trust_code: bool = False) -> VIModule:
    """Rebuild a model written by :func:`save`: same architecture, conversion and tensors.

    Args:
        map_location: device of the loaded model (default: CPU, whatever the device it was
            saved from); a dict maps the device it was saved from, as in ``torch.load``
            (``{"cuda:0": "cpu"}``; a device it does not name loads on CPU).
        arch: override the recorded recipe's callable (``"module:callable"`` or a callable),
            e.g. when the architecture moved to another module. It is called with the
            recorded keyword arguments and trusted as given.
        mapping: the custom ``mapping`` the model was converted with (it cannot be recorded).
        trust_code: let the file's recipe import a module that is neither imported yet nor
            part of a trusted model package (see :mod:`bayesify.recipe`). Importing runs
            the module's code: only for files you trust. Alternatively import the module
            yourself before calling ``load``.

    Raises ``ValueError`` naming the file when it is not a bayesify file, is damaged, or
    the recipe does not rebuild the saved model. Tensors holding NaN or infinite values
    load, with a ``UserWarning`` naming them.
    """
    from safetensors import safe_open

    path = _fspath(path)
    header = read_spec(path)
    device = _device(map_location, header.get("saved_from_device"))
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
    point = build_arch(recipe, where=path, program=program, override=arch, trust_code=trust_code)
    if header["kind"] == "bayesify":
        model = _reconvert(point, header["conversion"], mapping, path, trust_code)
        model.conversion["arch"] = recipe  # so that bf.save(bf.load(p), q) needs no arch= again
        if program is not None:
            setattr(model, _PROGRAM_ATTR, program.numpy().tobytes())
    else:
        model = point
    _match_dtypes(model, tensors, path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the recorded architecture ({_describe(recipe)}) does not match the saved "
                         f"tensors: {_mismatch(exc)}; pass arch= to load() to rebuild it differently") from None
    _check_ties(model, header["aliases"], path)
    _warn_nonfinite(tensors, model, path)
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
    _check_readable(path, expected)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(exc)}); {expected}") from None
    if _META_KEY not in meta:
        raise ValueError(f"{path}: a safetensors file without a 'bayesify' header; {expected}")
    try:
        header = json.loads(meta[_META_KEY])
        if not isinstance(header, dict):
            raise TypeError("the header is not an object")
        version = header["format_version"]
        for key in ("conversion", "arch", "aliases"):
            if not isinstance(header[key], dict):
                raise TypeError(f"{key} is not an object")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in header["aliases"].items()):
            raise TypeError("aliases must map tensor names to tensor names (strings)")
        if header["kind"] not in ("bayesify", "module"):
            raise ValueError(f"unknown kind {header['kind']!r}")
    except RecursionError:
        raise ValueError(f"{path}: damaged bayesify header (nested too deeply to be one)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: damaged bayesify header ({exc!r})") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: bayesify file format {version!r}, written by bayesify "
                         f"{header.get('versions', {}).get('bayesify', '?')}; this bayesify reads format "
                         f"{FORMAT_VERSION}: upgrade bayesify")
    return header


# -- helpers ----------------------------------------------------------------------------------------------
def _point_root(model: nn.Module) -> nn.Module:
    """The converted model's root as its point type (a root that was itself a mapped layer)."""
    return model.to_point() if isinstance(model, VILayer) else model


def _check_conversion(spec: dict[str, Any]) -> None:
    """Fail at save time, not at load time, if the spec cannot be rebuilt."""
    from .priors import get_prior
    from .variational import get_variational

    try:
        for key, get in (("prior", get_prior), ("variational", get_variational)):  # one spec, or per module
            for one in ([spec[key]] if "name" in spec[key] else spec[key].values()):
                get(dict(one))
        json.dumps(spec, allow_nan=False)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot save this model portably: its prior / variational family cannot be "
                         f"rebuilt from the recorded spec ({exc}); custom families need a name registered "
                         "in bayesify.priors.PRIORS / bayesify.variational.VARIATIONAL") from None


def _reconvert(point: nn.Module, conv: dict[str, Any], mapping: dict | None, where: str,
               trust_code: bool = False) -> nn.Module:
    if conv.get("custom_mapping") and mapping is None:
        raise ValueError(f"{where}: the model was converted with a custom mapping; pass it: "
                         "bf.load(path, mapping={...})")
    try:
        include, exclude = conv.get("include"), conv.get("exclude", [])
        for key, value in (("include", include), ("exclude", exclude)):
            if value is not None and not isinstance(value, list):
                raise TypeError(f"{key} is a {type(value).__name__}, not a list")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reported when the model was converted
            return bayesify(point, prior=dict(conv["prior"]), variational=dict(conv["variational"]),
                            include=None if include is None else [class_pattern(p, trust_code) for p in include],
                            exclude=[class_pattern(p, trust_code) for p in exclude],
                            other_params=conv.get("other_params", "bayesian"),
                            estimator=conv.get("estimator", "reparam"), mapping=mapping, inplace=True,
                            new_modules=conv.get("new_modules", []))  # their priors are in the spec too
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


def _match_dtypes(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Give each rebuilt tensor the saved dtype in place (keeps ties and Parameter identity);
    a saved tensor of another kind (integer where the model holds floats) is refused."""
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        saved = tensors.get(name)
        if saved is not None and saved.dtype != t.dtype:
            if _dtype_kind(saved.dtype) != _dtype_kind(t.dtype):
                raise ValueError(f"{where}: tensor {name!r} is {saved.dtype} in the file, where the rebuilt model "
                                 f"holds {t.dtype}: an {_dtype_kind(saved.dtype)} tensor cannot stand in for a "
                                 f"{_dtype_kind(t.dtype)} one (a damaged or edited file)")
            t.data = t.data.to(saved.dtype)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    return "floating-point" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def _warn_nonfinite(tensors: dict[str, Tensor], model: nn.Module, where: str) -> None:
    """Warn about NaN anywhere and infinities in parameters (buffers may hold -inf masks)."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    bad = []
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()) or not t.numel():
            continue
        if bool(t.isnan().any()) or (name in params and not bool(t.isfinite().all())):
            bad.append(name)
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values ({shown}); the model's "
                      "outputs will be NaN / inf where they are used", UserWarning, stacklevel=3)


def _device(map_location: Any, saved: Any) -> torch.device:
    """The device to load onto: ``map_location`` (a device, or a dict mapping the saved one)."""
    target = map_location
    if map_location is None:
        target = "cpu"
    elif isinstance(map_location, dict):
        if not all(isinstance(k, str) and isinstance(v, (str, torch.device)) for k, v in map_location.items()):
            raise TypeError(f"map_location as a dict maps device names to devices (e.g. {{'cuda:0': 'cpu'}}), "
                            f"got {map_location!r}")
        target = map_location.get(str(saved), "cpu")
    elif not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be a device ('cpu', 'cuda:0' or a torch.device), a dict mapping the "
                        f"saved device to one ({{'cuda:0': 'cpu'}}) or None, got {type(map_location).__name__}; "
                        "bf.load places the whole model on one device, so a per-storage function is not accepted")
    try:
        return torch.device(target)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"map_location {target!r} is not a device ({_first_line(exc)})") from None


def stat_input(path: str, expected: str) -> os.stat_result:
    """``os.stat(path)``, or a one-line ``ValueError`` for a missing or unreadable input naming
    ``expected`` (what the caller wanted: a file, or a directory too)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file or directory ({expected})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def _check_readable(path: str, expected: str) -> None:
    """A clear error for a missing, unreadable or non-file input (before safetensors sees it)."""
    if not path:
        raise ValueError(f"no file name given (''); {expected}")
    st = stat_input(path, expected)
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a directory; {expected}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file; {expected}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def check_target(path: str, what: str = "path") -> None:
    """Refuse an output path that is not (or would not become) a regular file, before any work."""
    if not path:
        raise ValueError(f"{what} is empty (''); give a file name")
    if path.endswith(("/", os.sep)):
        raise ValueError(f"{what} {path} names a directory; give a file name")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None  # a new file (or a dangling symlink, which is replaced)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot check it ({exc.strerror or type(exc).__name__})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ValueError(f"{what} {path} is {kind}; bayesify writes (and replaces) only regular files")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{what} {path}: directory {directory} does not exist")


class _Terminated(BaseException):
    """SIGTERM arrived during a write (raised by the handler so that temporary files go)."""


@contextmanager
def removing_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into an exception for the block, so that its ``finally`` / ``except`` clauses
    remove temporary files; then deliver SIGTERM again to the previous handler (the default
    ends the process as SIGTERM would have). Only in the main thread (where signals go).
    ``kill -9`` cannot be caught: it may leave a hidden ``.NAME.*.tmp`` / ``.part`` file next to
    the target, never a partial target."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated(signum)

    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:  # the caller chose to ignore SIGTERM: keep it so
        yield
        return
    restore = previous if previous is not None else signal.SIG_DFL  # None: installed outside Python
    signal.signal(signal.SIGTERM, handler)
    delivered = False
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, restore)
        delivered = True
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler decides (default: end the process)
        raise
    finally:
        if not delivered:
            signal.signal(signal.SIGTERM, restore)


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

    check_target(path)
    directory = os.path.dirname(os.path.abspath(path))
    with removing_on_sigterm():
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _default_mode())  # mkstemp creates 0600; a saved model is an ordinary file
            check_target(path)  # again: it may have changed during the write
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


def _mismatch(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:400] + ("..." if len(text) > 400 else "")
