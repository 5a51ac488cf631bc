"""bf.save / bf.load: round trips over a table of models, the file format, refusals, atomic writes."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify import io as bio
from bayesify._pt2 import _Untrusted

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

ROOT = Path(__file__).resolve().parents[1]


# -- models (importable as tests.test_io:<name>, so recipes can name them) ----------------------------
class Tied(nn.Module):
    """Tied embedding / output weights, BatchNorm buffers, a raw parameter (general rule)."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, vocab, bias=False)
        self.out.weight = self.emb.weight
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(ids) * self.scale))


class NeedsArgs(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def build_mlp(width: int = 5) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))


def build_unannotated(width=5):  # noqa: ANN001, ANN201 - the point: no return annotation
    return build_mlp(width)


def _ids() -> tuple[tuple, dict]:
    return (torch.tensor([1, 2, 3, 4, 5, 10]),), {}


def _x3() -> tuple[tuple, dict]:
    return (torch.randn(4, 3),), {}


# name -> (build the BNN, what to pass to save, example inputs)
Case = tuple[Callable[[], nn.Module], dict[str, Any], Callable[[], tuple[tuple, dict]]]


def _bert() -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    return bf.bayesify(transformers.BertForMaskedLM(cfg))  # decoder tied to the word embeddings


def _exported() -> tuple[nn.Module, Any]:
    ep = torch.export.export(build_mlp(), (torch.randn(2, 3),), dynamic_shapes=({0: torch.export.Dim("b")},))
    return bf.bayesify(bio.exported_module(ep)), ep


CASES: dict[str, Case] = {
    "tied class, no args": (lambda: bf.bayesify(Tied()), {}, _ids),
    "factory via bayesify(arch=)": (lambda: bf.bayesify(build_mlp(7), arch=build_mlp, arch_kwargs={"width": 7}),
                                    {}, _x3),
    "class + arch_kwargs": (lambda: bf.bayesify(NeedsArgs(4)), {"arch_kwargs": {"width": 4}}, _x3),
    "root is a mapped layer": (lambda: bf.bayesify(nn.Linear(3, 2)),
                               {"arch": "torch.nn:Linear", "arch_kwargs": {"in_features": 3, "out_features": 2}},
                               _x3),
    "pointmass, exclude, other deterministic": (
        lambda: bf.bayesify(Tied(), variational="pointmass", exclude=["norm"], other_params="deterministic"),
        {}, _ids),
    "include by class, laplace prior, flipout": (
        lambda: bf.bayesify(build_mlp(), prior="laplace:scale=0.5", include=[nn.Linear], estimator="flipout"),
        {"arch": "tests.test_io:build_mlp"}, _x3),
    "hand-written VIModule": (lambda: HandWritten(), {}, _x3),
    # torch.nn containers: recorded layer by layer (no class of ours to name)
    "nn.Sequential MLP": (lambda: bf.bayesify(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.1),
                                                            nn.Linear(8, 2))), {}, _x3),
    "nn.Sequential CNN, nested, named": (lambda: bf.bayesify(nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                               nn.MaxPool2d(2)),
        flat=nn.Flatten(), norm=nn.LayerNorm(16), head=nn.Linear(16, 3)))),
        {}, lambda: ((torch.randn(2, 1, 4, 4),), {})),
    "nn.Sequential with an Embedding": (lambda: bf.bayesify(nn.Sequential(nn.Embedding(11, 4, padding_idx=0),
                                                                          nn.Flatten(0), nn.Linear(24, 2))),
                                        {}, _ids),
    "hugging face, tied": (_bert, {}, lambda: ((), {"input_ids": torch.tensor([[1, 2, 3, 4]])})),
}


class HandWritten(bf.VIModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = bf.nn.VILinear(3, 4, variational=bf.variational.MeanFieldNormal(init_std=0.1))
        self.head = bf.nn.VILinear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _samples(bnn: nn.Module, inputs: tuple[tuple, dict], seed: int = 0) -> torch.Tensor:
    args, kwargs = inputs
    with torch.no_grad():
        return _first(bnn(*args, samples=3, generator=torch.Generator().manual_seed(seed), **kwargs))


def _perturb(bnn: nn.Module) -> None:
    """Move every parameter and buffer off its initial value, so a round trip that loses one shows."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for t in list(bnn.parameters()) + [b for b in bnn.buffers() if b.is_floating_point()]:
            t.add_(0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_gives_the_same_samples(name: str, tmp_path: Path) -> None:
    build, save_kw, inputs = CASES[name]
    torch.manual_seed(0)
    bnn = build()
    _perturb(bnn)
    x = inputs()
    path = tmp_path / "m.bnn"
    bf.save(bnn, path, **save_kw)
    loaded = bf.load(path)
    assert type(loaded) is type(bnn)
    ref_state, new_state = bnn.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    for mode in ("eval", "train"):
        getattr(bnn, mode)(), getattr(loaded, mode)()
        torch.testing.assert_close(_samples(loaded, x), _samples(bnn, x), rtol=0, atol=0)
    bf.save(loaded, tmp_path / "again.bnn")  # the recipe travels with the loaded model
    again = bf.load(tmp_path / "again.bnn").eval()
    torch.testing.assert_close(_samples(again, x), _samples(loaded.eval(), x), rtol=0, atol=0)
    if isinstance(bnn, bf.BayesianModel):
        assert loaded.conversion["prior"] == bnn.conversion["prior"]
        assert loaded.conversion["variational"] == bnn.conversion["variational"]
        assert [(e.name, e.becomes) for e in loaded.conversion_plan.converted] == \
               [(e.name, e.becomes) for e in bnn.conversion_plan.converted]


def test_tied_parameters_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    bnn = bf.bayesify(Tied())
    bf.save(bnn, tmp_path / "t.bnn")
    header = bf.io.read_spec(tmp_path / "t.bnn")
    assert header["aliases"]["model.out.weight"] == "model.emb.weight"
    assert header["aliases"]["model.out.weight_rho"] == "model.emb.weight_rho"
    loaded = bf.load(tmp_path / "t.bnn")
    assert loaded.model.out.weight is loaded.model.emb.weight
    assert loaded.model.out.weight_rho is loaded.model.emb.weight_rho
    assert len(loaded.bayesian_sites()) == len(bnn.bayesian_sites())


def test_exported_program_is_embedded_and_trains(tmp_path: Path) -> None:
    bnn, ep = _exported()
    _perturb(bnn)
    bf.save(bnn, tmp_path / "e.bnn", arch=ep)
    assert bf.io.read_spec(tmp_path / "e.bnn")["arch"] == {"kind": "export"}
    loaded = bf.load(tmp_path / "e.bnn")
    x = torch.randn(5, 3)  # another batch size than exported with: the dynamic dim survives
    loaded.eval(), bnn.eval()
    torch.testing.assert_close(_samples(loaded, ((x,), {})), _samples(bnn, ((x,), {})), rtol=0, atol=0)
    bf.save(loaded, tmp_path / "again.bnn")  # the loaded model carries its program
    assert bf.io.read_spec(tmp_path / "again.bnn")["arch"] == {"kind": "export"}
    loaded.train()  # ExportedProgram.module() forbids train(); bayesify needs the mode switch
    out = loaded(x, samples=2)
    assert out.log_probs.shape == (2, 2)
    bf.ELBOLoss("normal", dataset_size=10)(out, torch.zeros(5, 2)).backward()


def test_dtypes_and_map_location(tmp_path: Path) -> None:
    bnn = bf.bayesify(Tied().to(torch.float64))
    bf.save(bnn, tmp_path / "d.bnn")
    loaded = bf.load(tmp_path / "d.bnn", map_location="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert loaded.model.norm.num_batches_tracked.dtype == torch.long
    assert next(loaded.parameters()).device.type == "cpu"
    assert bf.io.read_spec(tmp_path / "d.bnn")["saved_from_device"] == "cpu"


def test_state_dict_and_torch_save_round_trips(tmp_path: Path) -> None:
    bnn = bf.bayesify(Tied())
    _perturb(bnn)
    other = bf.bayesify(Tied())
    other.load_state_dict(bnn.state_dict(), strict=True)
    x = _ids()
    bnn.eval(), other.eval()
    torch.testing.assert_close(_samples(other, x), _samples(bnn, x), rtol=0, atol=0)
    torch.save(bnn, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(_samples(again, x), _samples(bnn, x), rtol=0, atol=0)


def test_bayesify_records_arch_and_checks_it_first() -> None:
    bnn = bf.bayesify(build_mlp(3), arch="tests.test_io:build_mlp", arch_kwargs={"width": 3})
    assert bnn.conversion["arch"] == {"kind": "callable", "target": "tests.test_io:build_mlp",
                                      "kwargs": {"width": 3}}
    json.dumps(bnn.conversion)
    model = build_mlp()
    with pytest.raises(ValueError, match="module:callable"):
        bf.bayesify(model, arch="no_colon")
    with pytest.raises(TypeError, match="JSON"):
        bf.bayesify(model, arch=build_mlp, arch_kwargs={"width": object()})
    assert all(type(m) is not bf.nn.VILinear for m in model.modules())


@pytest.mark.parametrize("arch, match", [
    (None, "constructor needs arguments"),
    ("os:system", "standard-library"),
    ("torch:load", "annotated to return"),
    ("tests.test_io:build_unannotated", "annotated to return"),
    ("tests.test_io:nothing_here", "no attribute"),
    ("no_such_module_xyz:f", "cannot import"),
    ("tests.test_io", "module:callable"),
])
def test_save_refuses_recipes_that_would_not_load_safely(arch: str | None, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        bf.save(bf.bayesify(NeedsArgs(3)), tmp_path / "x.bnn", arch=arch)
    assert not list(tmp_path.iterdir())


def test_save_refuses_what_cannot_be_rebuilt(tmp_path: Path) -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="not importable"):
        bf.save(bf.bayesify(Local()), tmp_path / "x.bnn")

    class OddPrior(bf.priors.Normal):
        name = "odd"

    with pytest.raises(ValueError, match="cannot save this model portably"):
        bf.save(bf.bayesify(Tied(), prior=OddPrior()), tmp_path / "x.bnn")
    with pytest.raises(TypeError, match="bayesify model"):
        bf.save(Tied(), tmp_path / "x.bnn")
    assert not list(tmp_path.iterdir())


def test_sequential_of_other_layers_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'1' is a tests.test_io.NeedsArgs, not a torch.nn layer.*arch="):
        bf.save(bf.bayesify(nn.Sequential(nn.Linear(3, 3), NeedsArgs(3))), tmp_path / "x.bnn")
    seq = bf.bayesify(nn.Sequential(nn.Linear(3, 3), nn.TransformerEncoderLayer(3, 1, 8)))
    with pytest.raises(ValueError, match="has submodules of its own"):
        bf.save(seq, tmp_path / "x.bnn")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tree, match", [
    ({"class": "Linear", "args": {"in_features": 1 << 20, "out_features": 1 << 20}}, "elements"),
    ({"class": "Sequential", "children": [["0", {"class": "Linear", "args": {"in_features": 1 << 16,
                                                                              "out_features": 1 << 15}}]] * 2},
     "elements"),
    ({"class": "functional", "args": {}}, "torch.nn has no module class 'functional'"),
    ({"class": "__class__", "args": {}}, "torch.nn has no module class"),
    ({"class": "Sequential", "children": {"0": 1}}, "needs 'children'"),
    ({"class": "Linear"}, "needs 'args'"),
    ([], "must be"),
])
def test_hostile_torch_nn_trees_are_refused(tree: Any, match: str, tmp_path: Path) -> None:
    """A file's torch.nn tree names classes of torch.nn only (nothing imported) and cannot make the
    loader allocate what no file could hold (sizes checked on the meta device first)."""
    from bayesify.recipe import build_nn_tree

    with pytest.raises(ValueError, match=match):
        build_nn_tree(tree)
    path, _ = _saved_with_arch(tmp_path, {"kind": "torch.nn", "tree": tree})
    with pytest.raises(ValueError, match="cannot rebuild the architecture"):
        bf.load(path)


def _saved_with_arch(tmp_path: Path, recipe: dict[str, Any]) -> tuple[Path, nn.Module]:
    """A saved Linear-in-a-Sequential whose header's architecture recipe is replaced by ``recipe``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    bnn = bf.bayesify(nn.Sequential(nn.Linear(3, 2)))
    path = tmp_path / "m.bnn"
    bf.save(bnn, path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["bayesify"])
    header["arch"] = recipe
    save_file(tensors, str(path), metadata={**meta, "bayesify": json.dumps(header)})
    return path, bnn


def test_file_of_an_older_version_naming_an_empty_sequential_says_what_to_do(tmp_path: Path) -> None:
    path, bnn = _saved_with_arch(tmp_path, {"kind": "callable", "target": "torch.nn.modules.container:Sequential",
                                            "kwargs": {}})  # what older versions wrote
    with pytest.raises(ValueError, match="empty torch.nn.Sequential.*pass arch= to bf.load"):
        bf.load(path)
    loaded = bf.load(path, arch=lambda: nn.Sequential(nn.Linear(3, 2)))
    assert torch.equal(loaded.state_dict()["model.0.weight"], bnn.state_dict()["model.0.weight"])


def test_custom_mapping_must_be_passed_back(tmp_path: Path) -> None:
    mapping = {**bf.nn.DEFAULT_MAPPING}
    bnn = bf.bayesify(Tied(), mapping=mapping)
    bf.save(bnn, tmp_path / "m.bnn")
    with pytest.raises(ValueError, match="custom mapping"):
        bf.load(tmp_path / "m.bnn")
    assert isinstance(bf.load(tmp_path / "m.bnn", mapping=mapping), bf.BayesianModel)


def test_load_arch_override_and_mismatch(tmp_path: Path) -> None:
    bf.save(bf.bayesify(NeedsArgs(4)), tmp_path / "n.bnn", arch_kwargs={"width": 4})
    loaded = bf.load(tmp_path / "n.bnn", arch=lambda width: NeedsArgs(width))
    assert loaded.model.fc.out_features == 4
    with pytest.raises(ValueError, match="does not match the saved tensors"):
        bf.load(tmp_path / "n.bnn", arch=lambda width: NeedsArgs(width + 1))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.bnn"
    bf.save(bf.bayesify(Tied()), good)
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "text": b"hello, not a model\n" * 4,
        "torch.save": None,
        "plain safetensors": None,
        "bad header json": None,
    }
    out = {}
    for name, content in files.items():
        p = tmp_path / f"{name.replace(' ', '_')}.bnn"
        if name == "torch.save":
            torch.save({"w": torch.ones(2)}, p)
        elif name == "plain safetensors":
            from safetensors.torch import save_file

            save_file({"w": torch.ones(2)}, str(p))
        elif name == "bad header json":
            from safetensors.torch import save_file

            save_file({"w": torch.ones(2)}, str(p), metadata={"bayesify": "{not json"})
        else:
            p.write_bytes(content)
        out[name] = p
    out["missing"] = tmp_path / "missing.bnn"
    return out


def test_damaged_and_foreign_files_raise_value_error_naming_the_file(tmp_path: Path) -> None:
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ValueError) as info:
            bf.load(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg, (name, msg)
        assert "bayesify" in msg, (name, msg)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    header = {"format_version": bio.FORMAT_VERSION + 1, "kind": "bayesify", "conversion": {}, "arch": {},
              "aliases": {}, "versions": {"bayesify": "9.0"}}
    save_file({"w": torch.ones(1)}, str(tmp_path / "new.bnn"), metadata={"bayesify": json.dumps(header)})
    with pytest.raises(ValueError, match="upgrade bayesify"):
        bf.load(tmp_path / "new.bnn")


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.bnn"
    bf.save(bf.bayesify(Tied()), path)
    before = path.read_bytes()

    def broken(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        bf.save(bf.bayesify(Tied()), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bnn"]
    monkeypatch.undo()
    mode = path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# -- torch.export programs: nothing in the file may be unpickled or executed -----------------------------
class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _rewrite(src: bytes, fn: Callable[[str, bytes], bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, fn(info.filename, zin.read(info.filename)))
    return out.getvalue()


def _json_edit(edit: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def fn(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            doc = json.loads(data)
            edit(doc)
            return json.dumps(doc).encode()
        return data
    return fn


def test_exported_programs_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.export.save(torch.export.export(build_mlp(), (torch.randn(2, 3),),
                                          dynamic_shapes=({0: torch.export.Dim("b")},)), buf)
    good = buf.getvalue()
    bio.load_exported_program(good)  # the honest file loads
    evil_pickle = io.BytesIO()
    torch.save(Evil(str(marker)), evil_pickle)
    shell = f"__import__('os').system('touch {marker}')"

    def use_pickle(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            doc = json.loads(data)
            for meta in doc["config"].values():
                meta["use_pickle"] = True
            return json.dumps(doc).encode()
        return data

    def sym(doc: dict) -> None:
        text = json.dumps(doc)
        doc.clear()
        doc.update(json.loads(text.replace("Symbol(", "__import__('os').system('true') or Symbol(", 1)))

    crafted = {
        "sample inputs pickle": lambda n, d: evil_pickle.getvalue() if "sample_inputs" in n else d,
        "guard code": _json_edit(lambda doc: doc.update(guards_code=[shell])),
        "shape expression": _json_edit(sym),
        "pickled weights": use_pickle,
        "extra pickle member": lambda n, d: d,  # plus an added member below
    }
    for name, fn in crafted.items():
        data = _rewrite(good, fn)
        if name == "extra pickle member":
            out = io.BytesIO(data)
            with zipfile.ZipFile(out, "a") as z:
                z.writestr(z.namelist()[0].split("/")[0] + "/data/weights/model.pt", evil_pickle.getvalue())
            data = out.getvalue()
        with pytest.raises(ValueError) as info:
            bio.load_exported_program(data)
        assert isinstance(info.value, _Untrusted), (name, info.value)
        assert not marker.exists(), name
    with pytest.raises(ValueError, match="not a torch.export"):
        bio.load_exported_program(b"PK\x03\x04 not really")


def test_a_saved_file_loads_in_a_fresh_process(tmp_path: Path) -> None:
    bnn = bf.bayesify(Tied())
    _perturb(bnn)
    bf.save(bnn, tmp_path / "t.bnn")
    bnn.eval()
    ref = _samples(bnn, _ids(), seed=7)
    code = (  # the file names tests.test_io:Tied, which a fresh process imports only when told to
        "import sys, torch, bayesify as bf\n"
        "import tests.test_io\n"
        "m = bf.load(sys.argv[1]).eval()\n"
        "out = m(torch.tensor([1, 2, 3, 4, 5, 10]), samples=3, generator=torch.Generator().manual_seed(7))\n"
        "torch.save(out.detach(), sys.argv[2])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.bnn"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, rtol=0, atol=0)


def test_nothing_is_unpickled_when_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bnn, ep = _exported()
    bf.save(bnn, tmp_path / "e.bnn", arch=ep)
    bf.save(bf.bayesify(Tied()), tmp_path / "t.bnn")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unrestricted unpickling during bf.load")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            refuse()
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    bf.load(tmp_path / "e.bnn")
    bf.load(tmp_path / "t.bnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_saved_on_gpu_loads_on_cpu(tmp_path: Path) -> None:
    bnn = bf.bayesify(Tied()).cuda()
    bf.save(bnn, tmp_path / "g.bnn")
    assert bf.io.read_spec(tmp_path / "g.bnn")["saved_from_device"].startswith("cuda")
    on_cpu = bf.load(tmp_path / "g.bnn")  # default: CPU, whatever the saving device
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    on_gpu = bf.load(tmp_path / "g.bnn", map_location="cuda")
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    assert on_gpu.model.out.weight is on_gpu.model.emb.weight
    sd, ref = on_cpu.state_dict(), bnn.state_dict()
    assert all(torch.equal(sd[k], ref[k].cpu()) for k in ref)


@pytest.mark.parametrize("path", [None, 5, b"/tmp/x.bnn"])
def test_save_and_load_name_what_a_path_must_be(path: Any) -> None:
    bnn = bf.bayesify(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"path must be a str or an os.PathLike \(e.g. pathlib.Path\), got"):
        bf.save(bnn, path)
    with pytest.raises(TypeError, match=r"path must be a str or an os.PathLike \(e.g. pathlib.Path\), got"):
        bf.load(path)
