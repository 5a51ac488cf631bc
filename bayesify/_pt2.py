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
import operator
import os
import re
import sys
import warnings
import zipfile
from typing import Any

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(_io.BytesIO(bytes(data)))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        raise ValueError(f"torch.export.load failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not trust_code:
        _check_graph(ep)
    return ep


_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}


def check_pt2(data: bytes) -> None:
    """Raise ``_Untrusted`` (a ``ValueError``) for any part of a .pt2 archive that would be
    unpickled or executed by ``torch.export.load``; ``ValueError`` if it is not one."""
    try:
        zf = zipfile.ZipFile(_io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"not a torch.export archive ({exc})") from None
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or not any(n.endswith("/archive_format") for n in names):
        raise ValueError("not a torch.export .pt2 archive (no archive_format)")
    prefix = prefixes.pop() + "/"
    try:
        if zf.read(prefix + "archive_format").strip() != b"pt2":
            raise ValueError("not a torch.export .pt2 archive")
        for name in names:
            rel = name[len(prefix):]
            if rel in _PT2_FIXED or rel.endswith("/") or rel.startswith("extra/"):
                continue
            if rel.startswith("models/") and rel.endswith(".json"):
                _check_program_json(json.loads(zf.read(name)), rel)
            elif re.fullmatch(r"data/(weights|constants)/\w+_config\.json", rel):
                _check_payload_config(json.loads(zf.read(name)), rel)
            elif re.fullmatch(r"data/weights/weight_\d+|data/constants/tensor_\d+", rel):
                continue  # raw tensor bytes
            elif rel.startswith("data/sample_inputs/") and rel.endswith(".pt"):
                try:
                    torch.load(_io.BytesIO(zf.read(name)), weights_only=True)
                except Exception as exc:  # noqa: BLE001
                    raise _Untrusted(f"its sample inputs need unrestricted unpickling ({_first_line(exc)})") from None
            elif rel.endswith(".pt") or rel.endswith(".pkl"):
                raise _Untrusted(f"it holds a pickle ({rel}) that torch.export.load unpickles without restriction")
            elif rel.startswith("data/aotinductor/"):
                raise _Untrusted("it holds compiled AOTInductor code (native code)")
            else:
                raise _Untrusted(f"unrecognised archive member {rel!r}")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"damaged torch.export archive ({_first_line(exc)})") from None


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
    for key in (prog.get("range_constraints") or {}):
        if not re.fullmatch(r"[A-Za-z_]\w*", str(key)):
            raise _Untrusted(f"symbol name {key!r} is not an identifier")
    stack = [prog]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr_str":
                    _check_expression(v, "shape expression")
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(x for x in node if isinstance(x, (dict, list)))


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


def _check_expression(text: Any, what: str) -> None:
    """Allow only arithmetic on sizes and sympy constructors (what torch writes), since
    ``torch.export.load`` evaluates these strings with ``eval`` / ``exec``."""
    if not isinstance(text, str):
        raise _Untrusted(f"{what} is not a string")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise _Untrusted(f"{what} {text[:60]!r} is not an expression") from None
    for node in ast.walk(tree):
        ok = isinstance(node, _SAFE_NODES)
        if isinstance(node, ast.Constant):
            ok = not isinstance(node.value, (str, bytes)) or bool(re.fullmatch(r"[A-Za-z_]\w*", str(node.value)))
        elif isinstance(node, ast.Name):
            ok = node.id in _SYMPY_NAMES or node.id.startswith("OpaqueUnaryFn_") or bool(
                re.fullmatch(r"[a-z]+\d+", node.id))
        elif isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            ok = (node.attr in _SAFE_ATTRS
                  or (base == "math" and not node.attr.startswith("_"))
                  or (base == "torch" and node.attr.startswith("sym_")))
        elif isinstance(node, ast.keyword):
            ok = node.arg is not None and not node.arg.startswith("_")
        if not ok:
            raise _Untrusted(f"{what} {text[:80]!r} is not plain size arithmetic "
                             f"({type(node).__name__} {getattr(node, 'id', getattr(node, 'attr', ''))})")


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
