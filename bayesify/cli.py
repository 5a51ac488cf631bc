"""The ``bayesify`` command: ``inspect``, ``convert`` and ``demo``.

One console for stdout (results), one for stderr (progress, warnings, errors) and one
error exit path: bad usage or bad input exits with status 2 and one line on stderr
(``--debug`` adds the traceback); an unexpected failure exits with 1.

MODEL_FILE formats are told apart by their content, never by unpickling:

- a ``torch.save`` file is first read with ``torch.load(weights_only=True)``: a state dict
  loads (it needs ``--arch``); a whole pickled model fails safely there and is refused
  unless ``--trust-pickle`` is given, because unpickling it runs code from the file;
- a ``torch.export`` ``.pt2`` program is loaded by :func:`bayesify._pt2.load_exported_program`,
  which refuses the parts of the format that would unpickle or execute code (without
  ``--trust-pickle``), and archives or expressions too large to check cheaply; it is
  embedded in the output so that ``bf.load`` can rebuild it;
- a safetensors state dict (with ``--arch``), a bayesify file (``inspect`` only) and a
  Hugging Face model directory (``config.json`` + weights) are read without pickle; a
  bayesify file imports only what :mod:`bayesify.recipe` allows, unless ``--trust-code``;
  a Hugging Face directory whose weights miss the model's tensors is refused.

Example::

    $ bayesify convert resnet.pt --arch torchvision.models:resnet18 --arch-kwargs '{"num_classes": 10}' -o resnet.bnn
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from rich.console import Console
from rich.text import Text

__all__ = ["main", "CLIError", "demo_finetune"]

EXPECTED = ("a torch.save file (a state dict, or a whole model with --trust-pickle), a torch.export .pt2 "
            "program, a safetensors state dict, or a Hugging Face model directory")


class CLIError(Exception):
    """Bad usage or bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


@dataclass
class _IO:
    out: Console
    err: Console
    notes: list[str]

    @contextmanager
    def stage(self, description: str) -> Iterator[None]:
        """A spinner with elapsed time on stderr (only on a terminal)."""
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=self.err, transient=True, disable=not self.err.is_terminal) as bar:
            bar.add_task(description, total=None)
            start = time.perf_counter()
            yield
        if self.err.is_terminal:
            self.err.print(Text(f"✓ {description} ({time.perf_counter() - start:.1f} s)", style="dim"))


# -- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="bayesify", description="Turn a PyTorch model into a Bayesian neural network.")
    parser.add_argument("--version", action="version", version=f"bayesify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,convert,demo}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model_file", metavar="MODEL_FILE", help=EXPECTED)
        p.add_argument("--arch", metavar="MODULE:CALLABLE",
                       help="builds the architecture of a state dict, e.g. torchvision.models:resnet18")
        p.add_argument("--arch-kwargs", metavar="JSON", help='keyword arguments for --arch, e.g. \'{"num_classes": 10}\'')
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow MODEL_FILE to run code while loading (a pickled whole model); only for trusted files")
        p.add_argument("--trust-code", action="store_true",
                       help="allow a bayesify MODEL_FILE to import the module its recipe names even when it is not "
                            "an installed model package (imports run code); only for trusted files")
        p.add_argument("--include", action="append", metavar="GLOB", help="convert only modules matching (repeatable)")
        p.add_argument("--exclude", action="append", metavar="GLOB", help="leave matching modules alone (repeatable)")
        p.add_argument("--variational", metavar="SPEC", help="e.g. meanfield:init_std=1e-3 or pointmass")
        p.add_argument("--other-params", choices=("bayesian", "deterministic"), default="bayesian",
                       help="parameters of unmapped modules (default: bayesian)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")

    p = sub.add_parser("inspect", help="show what would be converted, as a table")
    common(p)
    p.set_defaults(run=_inspect)

    p = sub.add_parser("convert", help="convert MODEL_FILE into a Bayesian model file (loads with bf.load)")
    common(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT_FILE", help="where to write the Bayesian model")
    p.add_argument("--prior", metavar="SPEC", help="e.g. normal:scale=0.1 or normal:loc=pretrained,scale=0.1")
    p.add_argument("--estimator", choices=("reparam", "local", "flipout"), default="reparam")
    p.add_argument("--force", action="store_true", help="overwrite OUT_FILE if it exists")
    p.set_defaults(run=_convert)

    p = sub.add_parser("demo", help="pretrain, convert and fine-tune a small network on scikit-learn digits")
    p.add_argument("--fast", action="store_true", help="a few epochs only (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    p.set_defaults(run=_demo)
    return parser


# -- entry point -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad usage / input, 1 failure)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    plain = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    out = Console(highlight=False, width=160 if plain else None)  # piped output: no narrow wrapping
    err = Console(stderr=True, highlight=False)
    io = _IO(out, err, [])
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        with _captured(io.notes):
            args.run(args, io)
    except CLIError as exc:
        return _fail(err, str(exc), debug, 2)
    except (ValueError, TypeError) as exc:
        return _fail(err, str(exc), debug, 2)
    except KeyboardInterrupt:
        return _fail(err, "interrupted", debug, 130)
    except Exception as exc:  # noqa: BLE001 - the one error exit path
        return _fail(err, f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                     debug, 1)
    for note in dict.fromkeys(io.notes):
        err.print(Text(f"warning: {note}", style="yellow"), soft_wrap=True)
    return 0


def _fail(err: Console, message: str, debug: bool, code: int) -> int:
    if debug:
        traceback.print_exc()
    line = " ".join(message.split()) or "failed"
    err.print(Text(f"bayesify: error: {line}" if not line.startswith("bayesify") else line, style="red"),
              soft_wrap=True)
    return code


@contextmanager
def _captured(notes: list[str]) -> Iterator[None]:
    """Warnings and log records become one-line notes, printed after a successful run."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(_one_line(record.getMessage()))

    handler = Handler(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            try:
                yield
            finally:
                notes.extend(_one_line(str(w.message)) for w in caught)
    finally:
        root.removeHandler(handler)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# -- reading MODEL_FILE ---------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: Any  # nn.Module (None for a bayesify file)
    description: str
    arch: Any = None  # for bf.save: None (found out), "module:callable", or an ExportedProgram
    arch_kwargs: dict | None = None
    bayesian: Any = None  # a loaded bayesify file


def _arch_kwargs(args: argparse.Namespace) -> dict | None:
    if args.arch_kwargs is None:
        return None
    try:
        value = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--arch-kwargs is not valid JSON ({exc}); expected an object such as "
                       "'{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise CLIError(f"--arch-kwargs must be a JSON object such as '{{\"num_classes\": 10}}', "
                       f"got {type(value).__name__}")
    return value


def _check_arch(args: argparse.Namespace) -> None:
    from .recipe import resolve_callable

    if args.arch is not None:
        try:
            resolve_callable(args.arch, trust_code=True)  # the user's own choice: may import any module
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--arch {args.arch}: {exc}") from None


def sniff(path: str) -> str:
    """The kind of MODEL_FILE from its first bytes: 'hf', 'pt2', 'torch', 'pickle', 'safetensors'."""
    import stat

    from .io import stat_input

    try:
        st = stat_input(path, f"expected {EXPECTED}")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        raise CLIError(f"{path} is a directory without config.json; expected {EXPECTED}")
    if not stat.S_ISREG(st.st_mode):
        raise CLIError(f"{path} is not a regular file; expected {EXPECTED}")
    size = st.st_size
    if size == 0:
        raise CLIError(f"{path} is empty; expected {EXPECTED}")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CLIError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CLIError(f"{path}: damaged or truncated zip archive ({exc})") from None
        if any(n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "torch"
        raise CLIError(f"{path} is a zip archive but neither torch.save nor torch.export output; expected {EXPECTED}")
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    raise CLIError(f"{path} is not a model file; expected {EXPECTED}")


def load_input(args: argparse.Namespace, io: _IO, allow_bayesian: bool = False) -> Loaded:
    path = args.model_file
    kwargs = _arch_kwargs(args)
    _check_arch(args)
    kind = sniff(path)
    if kind == "hf":
        if args.arch or kwargs:
            raise CLIError("--arch / --arch-kwargs do not apply to a Hugging Face directory (its config is used)")
        with io.stage(f"loading Hugging Face model from {path}"):
            return _load_hf(path)
    if kind == "pt2":
        from ._pt2 import _Untrusted, load_exported_program
        from .recipe import exported_module

        with io.stage(f"loading torch.export program {path}"):
            try:
                ep = load_exported_program(path, trust_code=args.trust_pickle)
            except _Untrusted as exc:
                raise CLIError(f"{path}: refusing to load this torch.export program because loading it would "
                               f"run code from the file ({exc}); pass --trust-pickle only if you trust its source")
            except ValueError as exc:
                raise CLIError(f"{path}: {exc}") from None
            model = exported_module(ep)
        return Loaded(model, f"torch.export program ({type(model).__name__})", args.arch or ep, kwargs)
    if kind == "safetensors":
        return _load_safetensors(path, args, io, kwargs, allow_bayesian)
    with io.stage(f"reading {path}"):
        obj = _torch_load(path, args.trust_pickle)
    from torch import nn

    if isinstance(obj, nn.Module):
        return Loaded(obj, f"pickled {type(obj).__name__} (--trust-pickle)", args.arch, kwargs)
    state = _state_dict_of(obj, path)
    return _with_arch(state, path, args, kwargs, io)


def _torch_load(path: str, trust: bool) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CLIError(f"{path}: damaged pickle data ({_one_line(exc, 120)}); expected {EXPECTED}") from None
        if not trust:
            raise CLIError(
                f"{path} is a pickled Python object (e.g. torch.save(model)); loading it runs code from the file, "
                "which can do anything your account can. Pass --trust-pickle only if you trust its source, or save "
                "a state dict (torch.save(model.state_dict())) and pass --arch MODULE:CALLABLE") from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError & co. for damaged files
        raise CLIError(f"{path}: cannot read it as a torch.save file ({_one_line(exc, 160)}); "
                       f"expected {EXPECTED}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"{path}: cannot unpickle it ({type(exc).__name__}: {_one_line(exc, 160)})") from None


def _state_dict_of(obj: Any, path: str) -> dict:
    import torch

    def is_state(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if is_state(obj.get(key)):
                return obj[key]
        keys = ", ".join(map(str, list(obj)[:6]))
        raise CLIError(f"{path} holds a dict that is not a state dict (keys: {keys}); expected {EXPECTED}")
    raise CLIError(f"{path} holds a {type(obj).__name__}, not a model or a state dict; expected {EXPECTED}")


def _load_safetensors(path: str, args: argparse.Namespace, io: _IO, kwargs: dict | None,
                      allow_bayesian: bool) -> Loaded:
    from safetensors import safe_open

    from .io import load

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if "bayesify" in meta:
                if not allow_bayesian:
                    raise CLIError(f"{path} is already a bayesify model (load it with bf.load); convert the "
                                   "original point model instead")
                state = None
            else:
                state = {k: f.get_tensor(k) for k in f.keys()}
    except CLIError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type
        raise CLIError(f"{path}: damaged safetensors file ({_one_line(exc, 160)})") from None
    if state is None:
        with io.stage(f"loading bayesify file {path}"):
            bnn = load(path, trust_code=args.trust_code or args.trust_pickle)
        return Loaded(None, f"bayesify file ({type(bnn.model).__name__})" if hasattr(bnn, "model")
                      else "bayesify file", bayesian=bnn)
    return _with_arch(state, path, args, kwargs, io)


def _with_arch(state: dict, path: str, args: argparse.Namespace, kwargs: dict | None, io: _IO) -> Loaded:
    from .recipe import build_arch

    if args.arch is None:
        raise CLIError(f"{path} holds a state dict ({len(state)} tensors) but not the architecture: pass "
                       "--arch MODULE:CALLABLE (e.g. --arch torchvision.models:resnet18 --arch-kwargs "
                       "'{\"num_classes\": 10}')")
    with io.stage(f"building {args.arch}"):
        try:
            model = build_arch({"kind": "callable", "target": args.arch, "kwargs": kwargs or {}}, where="--arch",
                               trust_code=True)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    problem = _state_mismatch(model, state)
    if problem:
        raise CLIError(f"{path}: the state dict does not fit --arch {args.arch}: {problem}")
    model.load_state_dict(state, strict=True)
    return Loaded(model, f"state dict ({len(state)} tensors) + {args.arch}", args.arch, kwargs)


def _state_mismatch(model: Any, state: dict) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    kinds = [f"{k} {state[k].dtype} vs {own[k].dtype}" for k in own
             if k in state and state[k].is_floating_point() != own[k].is_floating_point()]
    meta = [k for k, v in state.items() if v.is_meta]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes),
                         ("dtype kind mismatch", kinds), ("on the meta device (no values)", meta)):
        if items:
            parts.append(f"{label} {len(items)} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    return "; ".join(parts)


def _load_hf(path: str) -> Loaded:
    try:
        import transformers
    except ImportError:
        raise CLIError(f"{path} is a Hugging Face model directory; reading it needs transformers "
                       "(pip install transformers)") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        cls = cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else transformers.AutoModel
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise CLIError(f"{path}: cannot load the Hugging Face model ({type(exc).__name__}: "
                       f"{_one_line(exc, 200)})") from None
    # transformers' own load report is silenced above, so its findings are ours to report:
    # a missing tensor would be converted from its random initialisation.
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    total = len(model.state_dict())
    if missing:
        raise CLIError(f"{path}: its weights lack {len(missing)} of the {total} tensors of {type(model).__name__} "
                       f"({_few(missing)}); converting would keep their random initialisation. Save the model "
                       "with save_pretrained, or check that config.json names the architecture the weights "
                       "belong to")
    if unexpected:
        import warnings

        warnings.warn(f"{path}: {len(unexpected)} tensor(s) in its weights are not used by "
                      f"{type(model).__name__} ({_few(unexpected)})", UserWarning, stacklevel=2)
    return Loaded(model, f"Hugging Face {type(model).__name__}")


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


# -- commands -------------------------------------------------------------------------------------------
def _choices(args: argparse.Namespace) -> dict[str, Any]:
    """Validated --prior / --variational / selection (checked before any file is read)."""
    from .plan import default_prior, default_variational
    from .priors import get_prior
    from .variational import get_variational

    spec: dict[str, Any] = {"include": args.include, "exclude": args.exclude, "other_params": args.other_params}
    for flag, fn, default in (("prior", get_prior, default_prior()), ("variational", get_variational,
                                                                       default_variational())):
        text = getattr(args, flag, None)
        if text is not None:
            try:
                spec[flag] = fn(text, default)  # a partial spec keeps the default's other fields
            except (ValueError, TypeError) as exc:
                raise CLIError(f"--{flag} {text}: {exc}") from None
    return spec


def _inspect(args: argparse.Namespace, io: _IO) -> None:
    from .plan import plan

    choices = _choices(args)
    loaded = load_input(args, io, allow_bayesian=True)
    if loaded.bayesian is not None:
        bnn = loaded.bayesian
        conv = getattr(bnn, "conversion", {})
        io.out.print(f"{args.model_file}: {loaded.description}")
        if conv:
            io.out.print(f"prior {_spec_text(conv['prior'])}, variational {_spec_text(conv['variational'])}, "
                         f"estimator {conv.get('estimator')}", soft_wrap=True)
        the_plan = getattr(bnn, "conversion_plan", None)
        if the_plan is not None:
            io.out.print(the_plan.table())
        return
    with io.stage("planning"):
        the_plan = plan(loaded.model, include=choices["include"], exclude=choices["exclude"],
                        other_params=choices["other_params"], variational=choices.get("variational"))
    io.out.print(f"{args.model_file}: {loaded.description}", soft_wrap=True)
    io.out.print(the_plan.table())


def _convert(args: argparse.Namespace, io: _IO) -> None:
    import bayesify as bf

    from .io import removing_on_sigterm

    out = args.output
    choices = _choices(args)
    _check_output(out, args.force, args.model_file)
    loaded = load_input(args, io)
    with io.stage("converting"):
        bnn = bf.bayesify(loaded.model, prior=choices.get("prior"), variational=choices.get("variational"),
                          include=choices["include"], exclude=choices["exclude"],
                          other_params=choices["other_params"], estimator=args.estimator)
    directory = os.path.dirname(os.path.abspath(out))
    with removing_on_sigterm():
        _write_checked(bnn, loaded, out, directory, args, io)
    p = bnn.conversion_plan
    size = os.path.getsize(out) / 1e6
    io.out.print(f"wrote {out} ({size:.1f} MB) from {loaded.description}", soft_wrap=True)
    io.out.print(f"{len(p.converted)} converted, {len(p.skipped)} skipped: {p.params_before:,} parameters -> "
                 f"{p.params_after:,}; prior {_spec_text(bnn.conversion['prior'])}, variational "
                 f"{_spec_text(bnn.conversion['variational'])}", soft_wrap=True)
    io.out.print(f"load it with: bf.load({out!r})", soft_wrap=True)


def _write_checked(bnn: Any, loaded: Loaded, out: str, directory: str, args: argparse.Namespace, io: _IO) -> None:
    """Write to a hidden temporary file, check that it loads, then rename it onto ``out``."""
    import bayesify as bf

    from .io import _default_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".part", dir=directory)
    os.close(fd)
    try:
        with io.stage(f"writing {out}"):
            try:
                bf.save(bnn, tmp, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs)
            except ValueError as exc:
                raise CLIError(f"cannot write {out}: {exc} (on the command line: --arch MODULE:CALLABLE "
                               "[--arch-kwargs JSON])") from None
        with io.stage("checking that the output loads"):
            try:
                bf.load(tmp)
            except ValueError as exc:
                raise CLIError(f"{out} would not load with bf.load, so it was not written: "
                               f"{str(exc).replace(tmp, out)} (on the command line: --arch MODULE:CALLABLE "
                               "[--arch-kwargs JSON])") from None
        _check_output(out, args.force, args.model_file)
        os.chmod(tmp, os.stat(out).st_mode & 0o777 if os.path.exists(out) else _default_mode())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _spec_text(spec: dict) -> str:
    if "name" not in spec:  # per module: {module name: spec, ..., "*": default}
        return "per module (the plan's prior column)"
    rest = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}:{rest}" if rest else spec["name"]


def _check_output(out: str, force: bool, source: str) -> None:
    from .io import check_target

    try:
        check_target(out, "-o")  # '', a directory, a device or a FIFO: refused before any work
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source):
        raise CLIError(f"-o {out} is MODEL_FILE itself; write to another file")
    if os.path.exists(out) and not force:
        raise CLIError(f"{out} exists; pass --force to overwrite it")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise CLIError(f"-o {out}: directory {directory} does not exist")


# -- demo ---------------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace, io: _IO) -> None:
    from .demo import DemoError, run_demo

    try:
        run_demo(fast=args.fast, seed=args.seed, out=io.out, err=io.err)
    except DemoError as exc:
        raise CLIError(str(exc)) from None


def __getattr__(name: str) -> Any:
    if name == "demo_finetune":  # moved to bayesify.demo
        from .demo import demo_finetune

        return demo_finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
