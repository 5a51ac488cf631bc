"""The ``bayesify`` command, run as a real process.

Each input format is converted by the installed console command (the entry point next to
``sys.executable``) and the output is loaded here, in another process, and sampled. The
error matrix runs through one process that calls the command's ``main`` once per case
with stdout / stderr captured at the file-descriptor level: the same code path as the
console command, without paying the ~5 s start-up (importing torch) per case.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bayesify as bf

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

ROOT = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """Importable as tests.test_cli:TinyNet; constructible without arguments."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build_tiny(hidden: int = 8) -> TinyNet:
    return TinyNet(hidden)


class Evil:
    """Unpickling this creates ``marker``: proof that the file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@dataclass
class Result:
    code: int
    out: str
    err: str


def _command() -> list[str]:
    script = Path(sys.executable).with_name("bayesify")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bayesify"]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "NO_COLOR": "1", "COLUMNS": "200"}


def cli(*args: str, cwd: Path, command: list[str] | None = None) -> Result:
    proc = subprocess.run([*(command or _command()), *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_failure(r: Result, *paths: Path) -> None:
    """Exit 2, exactly one line on stderr, no traceback, no output file left behind."""
    assert r.code == 2, (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r.err
    for p in paths:
        assert not p.exists(), p
        assert not [q for q in p.parent.iterdir() if q.name.startswith(f".{p.name}.")], "temporary file left"


def _tiny_files(d: Path) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    torch.save(model.state_dict(), d / "tiny_state.pt")
    torch.save(model, d / "tiny_whole.pt")
    return model


def _samples(path: Path, *args: Any, **kwargs: Any) -> torch.Tensor:
    bnn = bf.load(path).eval()
    out = bnn(*args, samples=3, generator=torch.Generator().manual_seed(0), **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_state_dict_with_arch(tmp_path: Path) -> None:
    model = _tiny_files(tmp_path)
    r = cli("convert", "tiny_state.pt", "--arch", "tests.test_cli:build_tiny", "--arch-kwargs", '{"hidden": 8}',
            "--prior", "normal:scale=0.5", "--variational", "meanfield:init_std=1e-2", "--exclude", "fc2",
            "-o", "tiny.bnn", cwd=tmp_path)
    assert r.code == 0, r.err
    assert "wrote tiny.bnn" in r.out and "Traceback" not in r.err
    bnn = bf.load(tmp_path / "tiny.bnn")
    assert bnn.conversion["prior"] == {"name": "normal", "loc": "pretrained", "scale": 0.5}  # partial spec: default loc kept
    assert bnn.conversion["exclude"] == ["fc2"]
    assert isinstance(bnn.model.fc1, bf.nn.VILinear) and type(bnn.model.fc2) is nn.Linear
    torch.testing.assert_close(bnn.model.fc1.weight, model.fc1.weight)  # means = the input weights
    out = _samples(tmp_path / "tiny.bnn", torch.randn(5, 4))
    assert out.shape == (3, 5, 3) and torch.isfinite(out).all() and not torch.equal(out[0], out[1])


def test_pickled_module_is_refused_without_trust_pickle(tmp_path: Path) -> None:
    model = _tiny_files(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save(Evil(marker), tmp_path / "evil.pt")  # a torch.save zip whose pickle runs code
    r = cli("convert", "evil.pt", "-o", "evil.bnn", cwd=tmp_path)  # inspect: in the error matrix below
    assert_clean_failure(r, tmp_path / "evil.bnn")
    assert "--trust-pickle" in r.err and not marker.exists()
    r = cli("convert", "tiny_whole.pt", "--trust-pickle", "-o", "whole.bnn", cwd=tmp_path)
    assert r.code == 0, r.err
    bnn = bf.load(tmp_path / "whole.bnn")  # rebuilt from the recorded class, no pickle
    assert bf.io.read_spec(tmp_path / "whole.bnn")["arch"]["target"] == "tests.test_cli:TinyNet"
    torch.testing.assert_close(bnn.model.fc2.weight, model.fc2.weight)
    assert _samples(tmp_path / "whole.bnn", torch.randn(2, 4)).shape == (3, 2, 3)


def test_torch_export_program(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    ep = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "tiny.pt2")
    r = cli("convert", "tiny.pt2", "-o", "tiny.bnn", cwd=tmp_path)
    assert r.code == 0, r.err
    assert bf.io.read_spec(tmp_path / "tiny.bnn")["arch"] == {"kind": "export"}
    x = torch.randn(5, 4)
    out = _samples(tmp_path / "tiny.bnn", x)
    assert out.shape == (3, 5, 3)
    point = bf.load(tmp_path / "tiny.bnn")
    point.model.eval()
    torch.testing.assert_close(point.model(x), model(x))  # means = the exported weights


def test_hugging_face_directory(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    r = cli("convert", "hf", "--exclude", "*embeddings*", "-o", "hf.bnn", cwd=tmp_path)
    assert r.code == 0, r.err
    assert "BertForSequenceClassification" in r.out
    spec = bf.io.read_spec(tmp_path / "hf.bnn")
    assert spec["arch"]["target"] == "transformers:BertForSequenceClassification"
    out = _samples(tmp_path / "hf.bnn", input_ids=torch.tensor([[1, 5, 7, 2]]))
    assert out.shape == (3, 1, 2) and torch.isfinite(out).all()


def test_demo_fast(tmp_path: Path) -> None:
    r = cli("demo", "--fast", cwd=tmp_path, command=[sys.executable, "-m", "bayesify"])  # also: __main__
    assert r.code == 0, r.err
    for row in ("accuracy", "NLL", "ECE", "Brier", "AUROC held-out 8/9", "AUROC noise"):
        assert row in r.out, r.out
    assert "Traceback" not in r.err


# -- the error matrix, in one process ----------------------------------------------------------------
DRIVER = r"""
import json, os, sys, tempfile, traceback
from bayesify.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    saved, files = {}, {}
    sys.stdout.flush(); sys.stderr.flush()
    for fd in (1, 2):
        files[fd] = tempfile.TemporaryFile()
        saved[fd] = os.dup(fd)
        os.dup2(files[fd].fileno(), fd)
    crash = None
    try:
        code = main(argv)
    except BaseException:
        code, crash = -1, traceback.format_exc()
    sys.stdout.flush(); sys.stderr.flush()
    text = {}
    for fd in (1, 2):
        os.dup2(saved[fd], fd)
        os.close(saved[fd])
        files[fd].seek(0)
        text[fd] = files[fd].read().decode(errors="replace")
    results.append({"code": code, "out": text[1], "err": text[2], "crash": crash})
print(json.dumps(results))
"""


def test_bad_usage_and_bad_input_exit_2_with_one_line(tmp_path: Path) -> None:
    _tiny_files(tmp_path)
    d = tmp_path
    (d / "empty.pt").write_bytes(b"")
    data = (d / "tiny_state.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "notes.txt").write_text("not a model\n")
    (d / "existing.bnn").write_text("keep me")
    (d / "existing2.bnn").write_text("replace me")
    bf.save(bf.bayesify(TinyNet()), d / "ready.bnn")
    marker = d / "MARKER"
    torch.save(Evil(marker), d / "evil.pt")
    with open(d / "evil.pkl", "wb") as f:
        pickle.dump(Evil(marker), f)
    import io
    import zipfile

    buf = io.BytesIO()
    torch.export.save(torch.export.export(TinyNet(), (torch.randn(2, 4),)), buf)
    evil_inputs = io.BytesIO()
    torch.save(Evil(marker), evil_inputs)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(d / "evil.pt2", "w") as zout:
        for info in zin.infolist():
            body = evil_inputs.getvalue() if "sample_inputs" in info.filename else zin.read(info.filename)
            zout.writestr(info, body)
    (d / "truncated.pt2").write_bytes(buf.getvalue()[:500])
    torch.save(TinyNet(hidden=5), d / "tiny5_whole.pt")  # its class rebuilds hidden=8 without arguments
    arch = ["--arch", "tests.test_cli:build_tiny"]
    out = d / "out.bnn"
    failures = {
        "empty file": ["inspect", "empty.pt"],
        "truncated file": ["convert", "truncated.pt", *arch, "-o", "out.bnn"],
        "not a model": ["convert", "notes.txt", "-o", "out.bnn"],
        "missing file": ["convert", "missing.pt", *arch, "-o", "out.bnn"],
        "unknown --arch": ["convert", "tiny_state.pt", "--arch", "no_such_pkg.models:net", "-o", "out.bnn"],
        "--arch not a model": ["convert", "tiny_state.pt", "--arch", "os:system", "-o", "out.bnn"],
        "bad --arch-kwargs JSON": ["convert", "tiny_state.pt", *arch, "--arch-kwargs", "{hidden: 8", "-o", "out.bnn"],
        "--arch-kwargs not an object": ["convert", "tiny_state.pt", *arch, "--arch-kwargs", "[8]", "-o", "out.bnn"],
        "state dict without --arch": ["convert", "tiny_state.pt", "-o", "out.bnn"],
        "state dict does not fit": ["convert", "tiny_state.pt", *arch, "--arch-kwargs", '{"hidden": 5}',
                                    "-o", "out.bnn"],
        "unknown prior": ["convert", "tiny_state.pt", *arch, "--prior", "cauchy", "-o", "out.bnn"],
        "bad variational": ["convert", "tiny_state.pt", *arch, "--variational", "meanfield:init_std=-1",
                            "-o", "out.bnn"],
        "include matches nothing": ["convert", "tiny_state.pt", *arch, "--include", "nope*", "-o", "out.bnn"],
        "missing -o": ["convert", "tiny_state.pt"],
        "no command": [],
        "unknown option": ["inspect", "tiny_state.pt", "--frobnicate"],
        "output directory missing": ["convert", "tiny_state.pt", *arch, "-o", "no/such/dir/out.bnn"],
        "output exists, no --force": ["convert", "tiny_state.pt", *arch, "-o", "existing.bnn"],
        "evil torch.save, inspect": ["inspect", "evil.pt"],
        "evil pickle, inspect": ["inspect", "evil.pkl"],
        "evil pickle, convert": ["convert", "evil.pkl", "-o", "out.bnn"],
        "evil .pt2 sample inputs": ["convert", "evil.pt2", "-o", "out.bnn"],
        "truncated .pt2": ["inspect", "truncated.pt2"],
        "bayesify file as input": ["convert", "ready.bnn", "-o", "out.bnn"],
        "pickled model, recipe mismatch": ["convert", "tiny5_whole.pt", "--trust-pickle", "-o", "out.bnn"],
    }
    successes = {
        "inspect": ["inspect", "tiny_state.pt", *arch, "--exclude", "fc2"],
        "--force overwrites": ["convert", "tiny_state.pt", *arch, "-o", "existing2.bnn", "--force"],
        "--debug shows the traceback": ["convert", "notes.txt", "-o", "out.bnn", "--debug"],
        "pickled model + --arch-kwargs": ["convert", "tiny5_whole.pt", "--trust-pickle", "--arch-kwargs",
                                          '{"hidden": 5}', "-o", "tiny5.bnn"],
    }
    cases = {**failures, **successes}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(list(cases.values()))], cwd=d, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = dict(zip(cases, (Result(r["code"], r["out"], r["err"]) for r in json.loads(
        proc.stdout.strip().splitlines()[-1]))))
    for name in failures:
        r = results[name]
        assert r.code == 2, (name, r)
        assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, (name, r.err)
        assert not out.exists(), name
    assert not marker.exists()
    assert "--trust-pickle" in results["evil torch.save, inspect"].err
    assert "--trust-pickle" in results["evil pickle, convert"].err
    assert "--trust-pickle" in results["evil pickle, inspect"].err
    assert "sample inputs" in results["evil .pt2 sample inputs"].err
    assert "--force" in results["output exists, no --force"].err
    assert (d / "existing.bnn").read_text() == "keep me"
    assert "already a bayesify model" in results["bayesify file as input"].err
    assert "would not load" in results["pickled model, recipe mismatch"].err
    assert ".part" not in results["pickled model, recipe mismatch"].err
    assert results["pickled model + --arch-kwargs"].code == 0, results["pickled model + --arch-kwargs"].err
    assert bf.load(d / "tiny5.bnn").model.fc1.out_features == 5
    assert "hidden" in results["bad --arch-kwargs JSON"].err or "JSON" in results["bad --arch-kwargs JSON"].err
    assert "missing" in results["state dict does not fit"].err or "shape" in results["state dict does not fit"].err

    assert results["inspect"].code == 0 and "VILinear" in results["inspect"].out
    assert "not selected" in results["inspect"].out
    assert results["--force overwrites"].code == 0, results["--force overwrites"].err
    assert isinstance(bf.load(d / "existing2.bnn"), bf.BayesianModel)
    debug = results["--debug shows the traceback"]
    assert debug.code == 2 and "Traceback" in debug.err and debug.err.strip().splitlines()[-1].startswith("bayesify")
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_demo_finetune_exclusive_flags() -> None:
    from bayesify.demo import _cnn, demo_finetune

    with pytest.raises(ValueError, match="map_control and rank1 are exclusive"):
        demo_finetune(_cnn(), torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 1, 1, 0,
                      map_control=True, rank1=True)
