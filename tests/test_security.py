"""Hostile and careless inputs: what a file may import, crafted programs, wrong weights,
output paths that are not files, signals during a write, and bad inputs that must give one
clear line. Processes are real (``python -c``, ``python -m bayesify``) wherever the point is
what a fresh process does."""

from __future__ import annotations

import ast
import json
import os
import signal
import stat
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bayesify as bf
from bayesify import recipe
from bayesify._pt2 import load_exported_program
from tests.test_cli import DRIVER, Result

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200"}


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _linear_file(path: Path) -> None:
    torch.manual_seed(0)
    bf.save(bf.bayesify(nn.Linear(3, 2)), path, arch="torch.nn:Linear",
            arch_kwargs={"in_features": 3, "out_features": 2})


def _rewrite(src: Path, dst: Path, header: Callable[[dict], Any] | None = None,
             tensors: Callable[[dict], Any] | None = None, raw_header: str | None = None) -> None:
    """Copy a bayesify file with its JSON header and / or tensors edited."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        ts = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["bayesify"])
    if header is not None:
        header(doc)
    if tensors is not None:
        tensors(ts)
    meta["bayesify"] = raw_header if raw_header is not None else json.dumps(doc)
    save_file(ts, str(dst), metadata=meta)


def _retarget(src: Path, dst: Path, target: str) -> None:
    _rewrite(src, dst, header=lambda d: d["arch"].update(target=target))


# -- 1. a file names a module: nothing is imported unless trusted ---------------------------------
PLANTED = """open({marker!r}, "w").close()
import torch
class Net(torch.nn.Linear):
    def __init__(self, in_features=3, out_features=2):
        super().__init__(in_features, out_features)
"""

LOAD_ALL = r"""
import sys, bayesify as bf
for p in sys.argv[1:]:
    try:
        bf.load(p)
        print("LOADED", p)
    except ValueError as exc:
        print("REFUSED", p, "|", str(exc).replace("\n", " "))
print("ALIVE")
"""


def test_planted_and_main_modules_are_not_imported_by_a_fresh_process(tmp_path: Path) -> None:
    _linear_file(tmp_path / "good.bnn")
    (tmp_path / "evil.py").write_text(PLANTED.format(marker="MARKER_evil"))
    (tmp_path / "timm.py").write_text(PLANTED.format(marker="MARKER_timm"))  # shadows a trusted package
    targets = {"evil.bnn": "evil:Net", "timm.bnn": "timm:Net", "pygments.bnn": "pygments.__main__:x",
               "tqdm.bnn": "tqdm.__main__:x", "model_dump.bnn": "torch.utils.model_dump.__main__:x"}
    for name, target in targets.items():
        _retarget(tmp_path / "good.bnn", tmp_path / name, target)
    r = _run([sys.executable, "-c", LOAD_ALL, *targets], cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert not list(tmp_path.glob("MARKER*")), (r.stdout, r.stderr)
    assert r.returncode == 0 and lines[-1] == "ALIVE", (r.returncode, r.stdout, r.stderr[-2000:])
    for name in targets:
        line = next(x for x in lines if x.split()[1] == name)
        assert line.startswith("REFUSED") and "trust_code=True" in line, line
    # python -m puts the current directory on sys.path as a full path (python -c: as ''); the
    # command line's __main__ case runs in the error matrix below
    r = _run([sys.executable, "-m", "bayesify", "inspect", "evil.bnn"], cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "--trust-code" in r.stderr, r.stderr
    assert not list(tmp_path.glob("MARKER*"))


def test_trust_rule_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"planted_net_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(PLANTED.format(marker=str(tmp_path / "MARKER")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    bf.save(bf.bayesify(nn.Linear(3, 2)), tmp_path / "m.bnn", arch=f"{name}:Net")  # the user's own arch
    assert (tmp_path / "MARKER").exists()
    (tmp_path / "MARKER").unlink()
    del sys.modules[name]  # as in a fresh process
    with pytest.raises(recipe.UntrustedImport, match=f"import {name}"):
        bf.load(tmp_path / "m.bnn")
    assert not (tmp_path / "MARKER").exists()
    assert isinstance(bf.load(tmp_path / "m.bnn", arch=f"{name}:Net"), bf.BayesianModel)  # user's arch=
    del sys.modules[name]
    assert isinstance(bf.load(tmp_path / "m.bnn", trust_code=True), bf.BayesianModel)
    assert isinstance(bf.load(tmp_path / "m.bnn"), bf.BayesianModel)  # imported now: nothing runs
    sys.modules.pop(name, None)
    # the rule itself: trusted installed packages pass without being imported, dunders never
    recipe.check_importable("torchvision.models")
    for bad in ("evil", "torch.utils.bottleneck.__main__", "bayesify.__main__",
                "torch.testing._internal.common_methods_invocations"):
        assert bad not in sys.modules
        with pytest.raises(recipe.UntrustedImport):
            recipe.check_importable(bad)


def test_recipe_module_ends_the_import_cycle() -> None:
    def imports(module: str) -> set[str]:
        tree = ast.parse((ROOT / "bayesify" / f"{module}.py").read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}

    assert "io" not in imports("convert") and "recipe" in imports("convert")
    assert not imports("recipe") & {"io", "convert", "cli"}


# -- 2. crafted programs cannot hang or exhaust the loader ---------------------------------------------
def _pt2() -> bytes:
    import io

    ep = torch.export.export(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), (torch.randn(2, 3),),
                             dynamic_shapes=({0: torch.export.Dim("b")},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def _edit_program(src: bytes, edit: Callable[[dict], None]) -> bytes:
    import io

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                doc = json.loads(data)
                edit(doc)
                data = json.dumps(doc).encode()
            zout.writestr(info, data)
    return out.getvalue()


def _replace_exprs(doc: dict, expr: str) -> None:
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr_str":
                    node[k] = expr
                else:
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def _zip_bomb(src: bytes, gib: float = 1.5) -> bytes:
    """``src`` with models/model.json replaced by ``gib`` GiB of zeros, deflated to ~1.5 MB.

    Written by hand (a deflate block of 1 MiB of zeros, repeated) since zlib would take
    ~10 s to compress that many zeros."""
    import struct

    chunk, n = bytes(1 << 20), int(gib * 1024)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) == block  # the state resets at each full flush
    stream = block * n + c.flush()
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    members = []
    with zipfile.ZipFile(__import__("io").BytesIO(src)) as zin:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                members.append((info.filename, 8, crc, stream, n << 20))
            else:
                members.append((info.filename, 0, zlib.crc32(data), data, len(data)))
    out, central = bytearray(), bytearray()
    for name, method, crc_, data, size in members:
        offset, raw = len(out), name.encode()
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc_, len(data), size, len(raw), 0)
        out += raw + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc_, len(data), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    return bytes(out + central + end)


LOAD_TIMED = r"""
import json, resource, sys, time
from bayesify._pt2 import load_exported_program, _Untrusted
results = {}
for path in sys.argv[1:]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        if path.endswith(".bnn"):
            import bayesify as bf
            bf.load(path)
        else:
            load_exported_program(path)
        outcome = "loaded"
    except _Untrusted as exc:
        outcome = "untrusted: " + str(exc)
    except ValueError as exc:
        outcome = "error: " + str(exc)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # MB (ru_maxrss is in KB)
    results[path] = [outcome, time.perf_counter() - start, grew]
    print(json.dumps(results), flush=True)
"""


def test_crafted_programs_are_refused_within_a_second(tmp_path: Path) -> None:
    good = _pt2()
    crafted = {
        "power.pt2": _edit_program(good, lambda d: _replace_exprs(d, "9**9**9**9")),
        "factorial.pt2": _edit_program(good, lambda d: d.update(guards_code=["math.factorial(10**9) == 1"])),
        "shift.pt2": _edit_program(good, lambda d: d.update(guards_code=["(1 << 10**10) == 1"])),
        "nested.pt2": _edit_program(good, lambda d: d.update(guards_code=["(((s0**64)**64)**64)**64 == 1"])),
        "bomb.pt2": _zip_bomb(good),
    }
    for name, data in crafted.items():
        (tmp_path / name).write_bytes(data)
    from bayesify.recipe import exported_module

    ep = torch.export.load(__import__("io").BytesIO(good))
    bf.save(bf.bayesify(exported_module(ep)), tmp_path / "good.bnn", arch=ep)  # the program embedded
    _rewrite(tmp_path / "good.bnn", tmp_path / "power.bnn", tensors=lambda t: t.update(
        {"__bayesify__.exported_program": torch.frombuffer(bytearray(crafted["power.pt2"]), dtype=torch.uint8)}))
    crafted["power.bnn"] = b""
    assert len(crafted["bomb.pt2"]) < 3 << 20  # ~1.5 MB on disk, 1.5 GiB inflated
    with zipfile.ZipFile(tmp_path / "bomb.pt2") as z:
        assert max(i.file_size for i in z.infolist()) == 3 << 29
    load_exported_program(good)  # the honest program loads
    r = _run([sys.executable, "-c", LOAD_TIMED, *crafted], cwd=tmp_path, timeout=120)
    results = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
    assert set(results) == set(crafted), (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    for name, (outcome, seconds, grew_mb) in results.items():
        assert outcome.startswith("untrusted"), (name, outcome)
        assert seconds < 1.0, (name, seconds)
        assert grew_mb < 200, (name, grew_mb)  # nothing was inflated
    assert "zip bomb" in results["bomb.pt2"][0]


class _Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x).reshape(x.shape[0], 4, -1).mean(-1)
        return self.fc(y) * x.shape[2] ** 2, y[: x.shape[0] // 2]


def test_honest_programs_with_powers_and_derived_sizes_still_load() -> None:
    """torch writes Pow(Symbol, Integer(2)), guards on x.size(), and '2*s0' range keys."""
    import io

    half = torch.export.Dim("half", min=1, max=32)
    ep = torch.export.export(_Shapes(), (torch.randn(4, 3, 8, 8),),
                             dynamic_shapes=({0: 2 * half, 2: torch.export.Dim("h", min=4, max=32)},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    text = buf.getvalue().decode("latin-1")
    assert "Pow(" in text and "guards_code" in text
    out = load_exported_program(buf.getvalue()).module()(torch.randn(6, 3, 5, 8))
    assert out[0].shape == (6, 2) and out[1].shape == (3, 4)


# -- 5. outputs that are not regular files; SIGTERM during a write --------------------------------------
def _char_device(tmp_path: Path) -> Path:
    """A character device that may be replaced without harm: our own copy of /dev/null as root."""
    path = tmp_path / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return path
    except (PermissionError, OSError):
        return Path("/dev/null")  # not root: cannot be replaced anyway


def test_save_refuses_non_regular_targets_before_any_work(tmp_path: Path) -> None:
    bnn = bf.bayesify(nn.Linear(3, 2), arch="torch.nn:Linear", arch_kwargs={"in_features": 3, "out_features": 2})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = _char_device(tmp_path)
    (tmp_path / "dir").mkdir()
    for target, words in ((fifo, "FIFO"), (device, "character device"), (tmp_path / "dir", "directory"),
                          ("", "empty"), (f"{tmp_path}/new/", "directory")):
        with pytest.raises(ValueError, match=words):
            bf.save(bnn, target)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISCHR(os.stat(device).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fifo", "dir"] + (["null"] if device.parent
                                                                                      == tmp_path else []))

    class NoRecipe(nn.Module):  # cannot be saved portably: the path must be refused first
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(3, width)

    with pytest.raises(ValueError, match="directory"):
        bf.save(bf.bayesify(NoRecipe(2)), tmp_path / "dir")


SIGTERM_DURING_WRITE = r"""
import os, signal, sys, time
import safetensors.torch as st
real = st.save_file
def save_then_term(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)  # the temporary file is complete on disk now
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
st.save_file = save_then_term
import torch, bayesify as bf
if sys.argv[1] == "save":
    bf.save(bf.bayesify(torch.nn.Linear(300, 200)), "out.bnn", arch="torch.nn:Linear",
            arch_kwargs={"in_features": 300, "out_features": 200})
else:
    from bayesify.cli import main
    torch.save(torch.nn.Linear(4, 3).state_dict(), "state.pt")
    main(["convert", "state.pt", "--arch", "torch.nn:Linear", "--arch-kwargs",
          '{"in_features": 4, "out_features": 3}', "-o", "out.bnn"])
print("NOT REACHED")
"""


@pytest.mark.parametrize("how", ["save", "convert"])
def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path: Path, how: str) -> None:
    r = _run([sys.executable, "-c", SIGTERM_DURING_WRITE, how], cwd=tmp_path, timeout=120)
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "NOT REACHED" not in r.stdout
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "state.pt")
    assert left == [], left


# -- 3, 5, 6: the command line's bad inputs, one process, one line each -----------------------------
def _hf_with_wrong_keys(d: Path, extra_only: bool = False) -> None:
    """A tiny BERT directory whose weights hold none of its tensors (or all of them plus one)."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(d)
    weights = {"encoder.weight": torch.zeros(3), "decoder.bias": torch.ones(2)}
    if extra_only:
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            weights = {"extra.weight": torch.zeros(3), **{k: f.get_tensor(k) for k in f.keys()}}
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_command_line_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    d = tmp_path
    _linear_file(d / "good.bnn")
    _rewrite(d / "good.bnn", d / "deep.bnn", raw_header='{"format_version": 1, "x": ' + "[" * 200_000
             + "]" * 200_000 + "}")
    _rewrite(d / "good.bnn", d / "int32.bnn", tensors=lambda t: t.update(
        {k: v.to(torch.int32) for k, v in t.items() if k.endswith("weight_mean") or k == "model.weight"}))
    _rewrite(d / "good.bnn", d / "aliases.bnn", header=lambda h: h.update(aliases={"model.bias": ["x"]}))
    torch.save({"weight": torch.empty(2, 3, device="meta"), "bias": torch.empty(2, device="meta")}, d / "meta.pt")
    good = _pt2()

    def system(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"][1]["target"] = "os.system"

    (d / "system.pt2").write_bytes(_edit_program(good, system))
    _hf_with_wrong_keys(d / "hf")
    _hf_with_wrong_keys(d / "hf_extra", extra_only=True)
    _retarget(d / "good.bnn", d / "pygments.bnn", "pygments.__main__:x")  # would end the process on import
    torch.save(nn.Linear(3, 2).state_dict(), d / "state.pt")
    os.mkfifo(d / "fifo.bnn")
    device = _char_device(d)
    (d / "outdir").mkdir()
    arch = ["--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 3, "out_features": 2}']
    cases = {
        "__main__ module": ["inspect", "pygments.bnn"],
        "deep header": ["inspect", "deep.bnn"],
        "int32 weights": ["inspect", "int32.bnn"],
        "aliases list": ["inspect", "aliases.bnn"],
        "meta state dict": ["convert", "meta.pt", *arch, "-o", "out.bnn"],
        "os.system graph": ["inspect", "system.pt2"],
        "HF wrong keys": ["convert", "hf", "-o", "out.bnn"],
        "-o FIFO --force": ["convert", "state.pt", *arch, "-o", "fifo.bnn", "--force"],
        "-o device --force": ["convert", "state.pt", *arch, "-o", str(device), "--force"],
        "-o directory": ["convert", "state.pt", *arch, "-o", "outdir"],
        "-o ''": ["convert", "state.pt", *arch, "-o", ""],
        "input is a FIFO": ["inspect", "fifo.bnn"],
    }
    if os.geteuid() != 0:  # root reads anything: chmod 000 denies nothing there
        (d / "locked.bnn").write_bytes((d / "good.bnn").read_bytes())
        os.chmod(d / "locked.bnn", 0)
        cases["unreadable input"] = ["inspect", "locked.bnn"]
    cases["HF unused tensor (succeeds)"] = ["convert", "hf_extra", "-o", "extra.bnn"]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(list(cases.values()))], cwd=d, env=_env(),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(zip(cases, (Result(r["code"], r["out"], r["err"]) for r in json.loads(
        proc.stdout.strip().splitlines()[-1]))))
    extra = results.pop("HF unused tensor (succeeds)")
    assert extra.code == 0 and "1 tensor(s) in its weights are not used by BertModel (extra.weight)" in extra.err, extra
    (d / "extra.bnn").unlink()
    for name, r in results.items():
        assert r.code == 2, (name, r)
        assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, (name, r.err)
    assert not (d / "out.bnn").exists()
    assert stat.S_ISFIFO(os.stat(d / "fifo.bnn").st_mode) and stat.S_ISCHR(os.stat(device).st_mode)
    err = {k: r.err for k, r in results.items()}
    assert "--trust-code" in err["__main__ module"] and "pygments.__main__" in err["__main__ module"]
    assert "nested too deeply" in err["deep header"]
    assert "int32" in err["int32 weights"] and "float" in err["int32 weights"]
    assert "aliases.bnn" in err["aliases list"] and "aliases" in err["aliases list"]
    assert "meta device" in err["meta state dict"]
    assert "os.system" in err["os.system graph"]
    hf = err["HF wrong keys"]
    n_missing = len(__import__("transformers").BertModel.from_pretrained(d / "hf").state_dict())
    assert f"lack {n_missing} of the {n_missing} tensors" in hf and "embeddings" in hf, hf
    assert "FIFO" in err["-o FIFO --force"] and "character device" in err["-o device --force"]
    assert "directory" in err["-o directory"] and "empty" in err["-o ''"]
    assert "not a regular file" in err["input is a FIFO"]
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]


# -- 6 / 7 in Python: loading damaged or odd files ------------------------------------------------------
def test_load_reports_bad_files_in_one_line(tmp_path: Path) -> None:
    _linear_file(tmp_path / "good.bnn")
    with pytest.raises(ValueError, match="no such file"):
        bf.load(tmp_path / "missing.bnn")
    with pytest.raises(ValueError, match="is a directory"):
        bf.load(tmp_path)
    _rewrite(tmp_path / "good.bnn", tmp_path / "deep.bnn",
             raw_header='{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _rewrite(tmp_path / "good.bnn", tmp_path / "aliases.bnn", header=lambda h: h.update(aliases={"a": ["b"]}))
    _rewrite(tmp_path / "good.bnn", tmp_path / "int32.bnn", tensors=lambda t: t.update(
        {k: v.to(torch.int32) for k, v in t.items() if v.is_floating_point()}))
    _rewrite(tmp_path / "good.bnn", tmp_path / "include.bnn", header=lambda h: h["conversion"].update(include="*"))
    for name, words in (("deep", "nested too deeply"), ("aliases", "aliases must map"), ("int32", "int32"),
                        ("include", "include is a str")):
        with pytest.raises(ValueError, match=words) as info:
            bf.load(tmp_path / f"{name}.bnn")
        assert len(str(info.value).splitlines()) == 1 and f"{name}.bnn" in str(info.value)
    if os.geteuid() != 0:
        os.chmod(tmp_path / "good.bnn", 0)
        with pytest.raises(ValueError, match="Permission denied"):
            bf.load(tmp_path / "good.bnn")
        os.chmod(tmp_path / "good.bnn", 0o644)


def test_nan_tensors_load_with_a_warning_naming_them(tmp_path: Path) -> None:
    _linear_file(tmp_path / "good.bnn")

    def poison(t: dict) -> None:
        name = next(k for k in t if k.endswith("weight_mean") or k == "model.weight")
        t[name] = t[name].clone()
        t[name][0, 0] = float("nan")

    _rewrite(tmp_path / "good.bnn", tmp_path / "nan.bnn", tensors=poison)
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) hold NaN or infinite values \(model\.weight"):
        bnn = bf.load(tmp_path / "nan.bnn")
    assert torch.isnan(bnn.model.weight).any()


def test_zero_bayesian_parameters_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for kwargs in ({"exclude": ["*"]}, {"include": ["1"]}):
        with pytest.raises(ValueError, match="nothing to convert.*widen include or narrow exclude"):
            bf.bayesify(model, **kwargs)
    with pytest.raises(ValueError, match="nothing to convert"):
        bf.bayesify(nn.ReLU())


def test_map_location_accepts_devices_and_dicts_and_refuses_callables(tmp_path: Path) -> None:
    _linear_file(tmp_path / "m.bnn")
    for loc in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}, None):
        assert bf.load(tmp_path / "m.bnn", map_location=loc).model.weight.device.type == "cpu"
    with pytest.raises(TypeError, match="map_location must be a device") as info:
        bf.load(tmp_path / "m.bnn", map_location=lambda storage, loc: storage)
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ValueError, match="not a device"):
        bf.load(tmp_path / "m.bnn", map_location="gpu7")
