"""Several modes from one pretrained network: quality.py rows that pool 5 fine-tunes (IVON, hotter
IVON, IVON from perturbed starts, MAP), beside IVON, MC dropout and the ensemble.

Run::

    python benchmarks/quality_modes.py --tasks digits --seeds 2 --threads 1 \\
        --methods "point,MC dropout,deep ensemble (5),IVON,IVON x5,IVON ess/10,IVON ess/10 x5,IVON perturbed x5,MAP x5"
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch

import bayesify as bf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402

warnings.simplefilter("ignore")

def _members(fit, k=5):
    def row(task, net, seed):
        bnns = [fit(task, copy.deepcopy(net), seed * 10 + j) for j in range(k)]
        def sampled(x):
            outs = []
            for j, b in enumerate(bnns):
                gen = torch.Generator().manual_seed(seed * 10 + j)
                outs.append(bf.loss.first_tensor(b(x, samples=task.pred_samples // k, generator=gen)))
            return torch.cat(outs)
        return q._wrap(task, sampled)
    return row

def _train_ivon_hot(task, net, seed, factor=0.1):
    bnn = task.convert(net)
    loss_fn = bf.NLLLoss(task.likelihood, **q._nll_kwargs(task))
    opt = bf.optim.IVON(task.trainable(bnn), model=bnn, ess=task.dataset_size * factor, **task.ivon_kwargs)
    q._finetune_loop(task, bnn, loss_fn, opt, 2, seed)
    return bnn

def _train_ivon_perturbed(task, net, seed):
    # start each member away from the pretrained weights: means + 1x the initial spread's noise
    bnn = task.convert(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in bnn.bayesian_sites():
            sd = torch.nn.functional.softplus(s.vparams()["rho"])
            s.mean.add_(sd * torch.randn(s.mean.shape, generator=g) * 3)
    loss_fn = bf.NLLLoss(task.likelihood, **q._nll_kwargs(task))
    opt = bf.optim.IVON(task.trainable(bnn), model=bnn, ess=task.dataset_size, **task.ivon_kwargs)
    q._finetune_loop(task, bnn, loss_fn, opt, 2, seed)
    return bnn

def _map(task, net, seed):
    bnn = task.convert(net, variational="pointmass")
    loss_fn = bf.ELBOLoss(task.likelihood, dataset_size=task.dataset_size, **q._nll_kwargs(task))
    opt = torch.optim.Adam(task.trainable(bnn), lr=1e-3)
    q._finetune_loop(task, bnn, loss_fn, opt, 1, seed)
    return bnn

q.METHODS["IVON x5"] = _members(q._train_ivon)
q.METHODS["IVON ess/10"] = lambda t, n, s: q._bnn_predictive(t, _train_ivon_hot(t, n, s), s)
q.METHODS["IVON ess/10 x5"] = _members(_train_ivon_hot)
q.METHODS["IVON perturbed x5"] = _members(_train_ivon_perturbed)
q.METHODS["MAP x5"] = _members(_map)
if __name__ == "__main__":
    q.main(sys.argv[1:])
