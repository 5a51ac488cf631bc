"""Safety checks for ``torch.export`` ``.pt2`` programs (private; used by :mod:`bayesify.io`
and the CLI).

``torch.export.load`` unpickles tensor subclasses, custom / opaque objects and (on fallback)
sample inputs, ``eval``s symbolic-shape expressions and ``exec``s guard code stored in the
file, so a crafted ``.pt2`` can run code when it is loaded. :func:`load_exported_program`
checks every such part first (:func:`check_pt2` on the archive, :func:`_check_graph` on the
loaded graph) and refuses what it cannot prove harmless with :class:`_Untrusted`.
"""

from __future__ import annotations

import ast
import io as _io
import json
import logging
import operator
import os
import re
import sys
import warnings
import zipfile
from contextlib import contextmanager
from typing import Any, Iterator

import torch


class _Untrusted(ValueError):
    """A .pt2 part that torch.export.load would unpickle or execute."""


def load_exported_program(source: str | os.PathLike | bytes, trust_code: bool = False) -> Any:
    """``torch.export.load`` that refuses files whose loading would unpickle or run code.

    ``torch.export.load`` unpickles tensor subclasses, custom / opaque objects and (on
    fallback) sample inputs, ``eval``s symbolic-shape expressions and ``exec``s guard code
    stored in the file. Without ``trust_code`` every such part is checked first: pickles
    must load with ``torch.load(weights_only=True)`` or be absent, expressions and guards
    must be plain arithmetic on sizes, and the graph may call only PyTorch operators.
    Raises ``ValueError`` otherwise (its message says what was found).
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        with open(os.fspath(source), "rb") as f:
            data = f.read()
    if not trust_code:
        check_pt2(bytes(data))
    logged: list[BaseException] = []
    try:
        with warnings.catch_warnings(), _quiet_torch_export_logs(logged):
            warnings.simplefilter("ignore")
            ep = torch.export.load(_io.BytesIO(bytes(data)))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        cause = logged[0] if logged else exc  # torch logs the real error, then raises a generic one
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ValueError(f"torch.export.load failed: {type(cause).__name__}: {_first_line(cause)}") from None
    if not trust_code:
        _check_graph(ep)
    return ep


@contextmanager
def _quiet_torch_export_logs(errors: list[BaseException]) -> Iterator[None]:
    """torch.export.load logs a multi-line traceback before it raises a generic error on a bad
    file: keep the logged exceptions (for a one-line message) instead of printing them."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                errors.append(record.exc_info[1])

    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    keep = Keep()
    for lg in loggers:
        lg.propagate, lg.handlers = False, [keep]
    try:
        yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved):
            lg.propagate, lg.handlers = propagate, handlers


_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}


# Size bounds, checked from the zip's central directory before anything is decompressed (and
# enforced again while reading, since the directory may lie): torch writes .pt2 members
# uncompressed, so their sizes add up to about the file's; a JSON document the size of a
# large model's graph is tens of MB.
MAX_JSON_BYTES = 256 << 20
MAX_EXPANSION = 16  # total uncompressed size <= 16 x the archive + MAX_JSON_BYTES
MAX_EXPRESSION_CHARS = 20_000


def check_pt2(data: bytes) -> None:
    """Raise ``_Untrusted`` (a ``ValueError``) for any part of a .pt2 archive that would be
    unpickled or executed by ``torch.export.load``, or that is too large to check cheaply
    (a zip bomb, a huge expression); ``ValueError`` if it is not a .pt2 archive."""
    try:
        zf = zipfile.ZipFile(_io.BytesIO(data))
        infos = zf.infolist()
        names = [i.filename for i in infos]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"not a torch.export archive ({exc})") from None
    _check_sizes(infos, len(data))
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or not any(n.endswith("/archive_format") for n in names):
        raise ValueError("not a torch.export .pt2 archive (no archive_format)")
    prefix = prefixes.pop() + "/"
    try:
        if _read(zf, prefix + "archive_format").strip() != b"pt2":
            raise ValueError("not a torch.export .pt2 archive")
        for name in names:
            rel = name[len(prefix):]
            if rel in _PT2_FIXED or rel.endswith("/") or rel.startswith("extra/"):
                continue
            if rel.startswith("models/") and rel.endswith(".json"):
                _check_program_json(json.loads(_read(zf, name)), rel)
            elif re.fullmatch(r"data/(weights|constants)/\w+_config\.json", rel):
                _check_payload_config(json.loads(_read(zf, name)), rel)
            elif re.fullmatch(r"data/weights/weight_\d+|data/constants/tensor_\d+", rel):
                continue  # raw tensor bytes
            elif rel.startswith("data/sample_inputs/") and rel.endswith(".pt"):
                try:
                    torch.load(_io.BytesIO(_read(zf, name)), weights_only=True)
                except Exception as exc:  # noqa: BLE001
                    raise _Untrusted(f"its sample inputs need unrestricted unpickling ({_first_line(exc)})") from None
            elif rel.endswith(".pt") or rel.endswith(".pkl"):
                raise _Untrusted(f"it holds a pickle ({rel}) that torch.export.load unpickles without restriction")
            elif rel.startswith("data/aotinductor/"):
                raise _Untrusted("it holds compiled AOTInductor code (native code)")
            else:
                raise _Untrusted(f"unrecognised archive member {rel!r}")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, json.JSONDecodeError, OSError, EOFError) as exc:
        raise ValueError(f"damaged torch.export archive ({_first_line(exc)})") from None
    except RecursionError:
        raise _Untrusted("its JSON is nested too deeply to check") from None


def _check_sizes(infos: list[zipfile.ZipInfo], archive_bytes: int) -> None:
    """Refuse, from the central directory alone, members that would expand beyond the bounds."""
    total = 0
    for info in infos:
        if info.file_size > MAX_JSON_BYTES and (info.compress_type != zipfile.ZIP_STORED
                                                or info.filename.endswith((".json", ".pt"))):
            raise _Untrusted(f"member {info.filename!r} would expand to {info.file_size:,} bytes (the bound "
                             f"is {MAX_JSON_BYTES:,} for a compressed or JSON member): a zip bomb?")
        total += info.file_size
    bound = MAX_EXPANSION * archive_bytes + MAX_JSON_BYTES
    if total > bound:
        raise _Untrusted(f"its members would expand to {total:,} bytes from a {archive_bytes:,}-byte archive "
                         f"(the bound is {bound:,}): a zip bomb?")


def _read(zf: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, never decompressing more than its bound (the directory may lie)."""
    with zf.open(name) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise _Untrusted(f"member {name!r} expands beyond {MAX_JSON_BYTES:,} bytes: a zip bomb?")
    return data


def _check_payload_config(cfg: Any, rel: str) -> None:
    entries = cfg.get("config", {}) if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"damaged torch.export archive ({rel})")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise ValueError(f"damaged torch.export archive ({rel})")
        if meta.get("use_pickle"):
            raise _Untrusted(f"{fqn} is stored as a pickle (a tensor subclass)")
        path_name = str(meta.get("path_name", ""))
        if not re.fullmatch(r"(weight|tensor)_\d+", path_name):
            raise _Untrusted(f"{fqn} is a {path_name.split('_')[0] or 'custom'} object, loaded by unpickling")


def _check_program_json(prog: Any, rel: str) -> None:
    if not isinstance(prog, dict):
        raise ValueError(f"damaged torch.export archive ({rel})")
    for guard in prog.get("guards_code") or []:
        _check_expression(guard, "guard")
    for key in (prog.get("range_constraints") or {}):  # a symbol or a size expression ('2*s74')
        _check_expression(key, "range constraint")
    stack = [prog]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            target = node.get("target")
            if isinstance(target, str) and "inputs" in node and not target.startswith(_TARGET_PREFIXES):
                raise _Untrusted(f"its graph calls {target}, which is not a PyTorch operator")
            for k, v in node.items():
                if k == "expr_str":
                    _check_expression(v, "shape expression")
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(x for x in node if isinstance(x, (dict, list)))


# How torch serialises the call targets it writes (operators, higher-order operators, the
# symbolic-size helpers); anything else (os.system) is refused before torch.export.load.
_TARGET_PREFIXES = ("torch.", "_operator.", "operator.", "math.", "builtins.")

_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Min", "Max", "Abs", "floor",
    "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "oo", "zoo", "nan", "true",
    "false", "True", "False", "None", "Piecewise", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "BitwiseFn_bitwise_xor", "cast_symbool_to_symint_guardless", "L", "args", "math", "torch", "inf",
}
_SAFE_ATTRS = {"size", "stride", "storage_offset", "dim", "numel", "shape"}
_SAFE_NODES = (ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.keyword,
               ast.Subscript, ast.Tuple, ast.Load, ast.operator, ast.boolop, ast.cmpop, ast.unaryop, ast.IfExp)


_MATH_NAMES = {"floor", "ceil", "trunc", "sqrt", "fabs", "log", "log2", "exp", "copysign", "isnan", "isinf",
               "isfinite", "inf", "nan", "pi", "e"}
_POWER_CALLS = {"Pow", "PowByNatural", "FloatPow", "LShift", "RShift", "pow"}
_MAX_EXPONENT = 64
_MAX_LITERAL = 1 << 64


def _check_expression(text: Any, what: str) -> None:
    """Allow only arithmetic on sizes and sympy constructors (what torch writes), since
    ``torch.export.load`` evaluates these strings with ``eval`` / ``exec``; and only what
    evaluates cheaply: literals within 64 bits, powers and shifts by a literal of at most 64
    (or by a symbol) whose base holds no other power, a bounded length, and no strings or
    tuples as operands (``'a' * 10**18``)."""
    if not isinstance(text, str):
        raise _Untrusted(f"{what} is not a string")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise _Untrusted(f"{what} of {len(text):,} characters is too long to check")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Untrusted(f"{what} {text[:60]!r} is not an expression") from None
    as_text = set()  # string constants in argument / key position (Symbol('s0'), L['x'])
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            as_text.update(id(a) for a in node.args)
            as_text.update(id(k.value) for k in node.keywords)
            if isinstance(node.func, ast.Name) and node.func.id in _POWER_CALLS and len(node.args) == 2:
                _check_power(node.args[0], node.args[1], text, what)
        elif isinstance(node, ast.Subscript):
            as_text.add(id(node.slice))
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, (ast.Pow, ast.LShift, ast.RShift)):
                _check_power(node.left, node.right, text, what)
            for side in (node.left, node.right):
                if isinstance(side, (ast.Tuple, ast.List)) or (
                        isinstance(side, ast.Constant) and isinstance(side.value, (str, bytes))):
                    raise _Untrusted(f"{what} {text[:80]!r} is not plain size arithmetic (a sequence as an operand)")
    for node in ast.walk(tree):
        ok = isinstance(node, _SAFE_NODES)
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, (str, bytes)):
                ok = id(node) in as_text and bool(re.fullmatch(r"[A-Za-z_]\w*", str(v)))
            else:
                ok = v is None or isinstance(v, (bool, float)) or (isinstance(v, int) and abs(v) <= _MAX_LITERAL)
        elif isinstance(node, ast.Name):
            ok = node.id in _SYMPY_NAMES or node.id.startswith("OpaqueUnaryFn_") or bool(
                re.fullmatch(r"[a-z]+\d+", node.id))
        elif isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            ok = (node.attr in _SAFE_ATTRS
                  or (base == "math" and node.attr in _MATH_NAMES)
                  or (base == "torch" and node.attr.startswith("sym_")))
        elif isinstance(node, ast.keyword):
            ok = node.arg is not None and not node.arg.startswith("_")
        if not ok:
            raise _Untrusted(f"{what} {text[:80]!r} is not plain size arithmetic "
                             f"({type(node).__name__} {getattr(node, 'id', getattr(node, 'attr', ''))})")


def _check_power(base: ast.AST, exponent: ast.AST, text: str, what: str) -> None:
    """``base ** exponent`` (or a shift) must be cheap to evaluate whatever the symbols are."""
    e = exponent
    for _ in range(3):  # -2, Integer(2), Integer(-2), -Integer(2)
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub):
            e = e.operand
        elif (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id in ("Integer", "Float")
              and len(e.args) == 1 and not e.keywords):
            e = e.args[0]
    small = isinstance(e, ast.Constant) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool) \
        and abs(e.value) <= _MAX_EXPONENT
    symbol = (isinstance(e, ast.Name) and bool(re.fullmatch(r"[a-z]+\d+", e.id))) or (
        isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "Symbol")
    nested = any(isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Pow, ast.LShift, ast.RShift))
                 or isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _POWER_CALLS
                 for n in ast.walk(base))
    if not (small or symbol) or nested:
        raise _Untrusted(f"{what} {text[:80]!r} raises to a power that may not evaluate cheaply (exponents and "
                         f"shifts must be a literal of at most {_MAX_EXPONENT} or a size symbol, not nested)")


_SAFE_OPERATORS = {getattr(operator, n) for n in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")}


def _safe_torch_functions() -> set[Any]:
    """The non-operator functions torch's own export verifier admits, minus custom autograd calls."""
    import math

    fns: set[Any] = {math.ceil, math.floor, math.trunc, round, torch.sym_int, torch.sym_float, torch.sym_ite,
                     torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sqrt, torch.sym_sum,
                     torch.autograd.grad_mode.set_grad_enabled, torch._C._set_grad_enabled}
    for mod, name in (("torch.amp.autocast_mode", "_enter_autocast"), ("torch.amp.autocast_mode", "_exit_autocast"),
                      ("torch.fx.experimental.symbolic_shapes", "cast_symbool_to_symint_guardless")):
        fn = getattr(sys.modules.get(mod), name, None)
        if fn is not None:
            fns.add(fn)
    return fns


def _check_graph(ep: Any) -> None:
    """The graph may call only PyTorch operators (a crafted graph could name any ``torch.*`` function)."""
    ops = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    allowed = _safe_torch_functions()
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op in ("call_method", "call_module"):
                raise _Untrusted(f"its graph has a {node.op} node ({node.target}); torch.export graphs call operators")
            if node.op != "call_function":
                continue
            t = node.target
            if isinstance(t, ops) or t in _SAFE_OPERATORS or t in allowed:
                continue
            mod, name = getattr(t, "__module__", None), getattr(t, "__name__", repr(t))
            raise _Untrusted(f"its graph calls {mod}.{name}, which is not a PyTorch operator")


def _first_line(exc: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
