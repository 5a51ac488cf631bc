"""Post-hoc Laplace: one curvature pass over the data sets every site's spread.

``bf.laplace(bnn, loader)`` keeps the posterior means (the pretrained / trained weights) and
sets each site's variance to the Laplace posterior around them,

    var = 1 / (H + prior_precision)          (diagonal sites)
    var = diag((H + prior_precision I)^-1)   (sites with structure "full")

where ``H`` is the generalised Gauss-Newton (GGN) matrix of the negative log likelihood
summed over the data set. What is computed:

- ``likelihood="categorical"``, ``curvature="ggn"``: the *exact* GGN diagonal,
  ``sum_c (J^T L)_c^2`` with ``L L^T = diag(p) - p p^T``; ``L = diag(sqrt p) - p sqrt(p)^T``,
  so column ``c`` of ``J^T L`` is the gradient of ``sqrt(p_c) (f_c - p.f)`` (``p`` held fixed):
  ``C`` gradients per example. For a softmax this equals the exact Fisher
  ``E_{y ~ p}[(d log p_y)^2]``.
- ``curvature="mc"``: the Monte Carlo Fisher with one label drawn from the model per example:
  one gradient per example instead of ``C``, unbiased, noisier; for many classes (language
  models) or large networks. ``curvature="auto"`` (default): exact up to ``AUTO_EXACT_COLUMNS``
  outputs per example, MC beyond.
- ``likelihood="normal"``: ``J^T J / noise_std^2`` (GGN = Fisher), ``noise_std`` given or the
  maximum-likelihood value from the residuals of the pass.
- A selection that is one ``Linear`` whose output *is* the prediction (``include="last_layer"``
  on a classifier head) needs no Jacobian: its GGN is ``sum_n Lambda_n (x) a_n a_n^T`` from the
  layer's inputs ``a_n``, collected by a hook during one forward pass.

How the per-example gradients are formed (``method=``): ``"backprop"`` (``bayesify._backprop_ggn``):
one forward records each site module's input, one backward per loss-Hessian column gives each
module's per-example output gradients, and each site's per-example gradients follow in closed
form (Linear, Conv1d/2d, LayerNorm, Embedding; any other module by ``torch.func`` on the module
alone) -- no per-example Jacobian of the network and no ``vmap`` over its examples (which Hugging
Face's mask checks refuse). ``"per_example"``: ``torch.func`` per-example Jacobians of the whole
network (``vmap`` over the examples of ``jacrev``; example by example where vmap fails), the
reference. ``"auto"`` (default): backprop, after checking it against plain autograd on two
examples of the first batch; per example where it does not apply (a tied parameter, a parameter
read outside its module's forward, a module that runs twice).

The prior precision is chosen by the Laplace marginal likelihood of a zero-centred Gaussian
prior (the weight-decay reading of the trained weights), per site (``prior_structure="site"``)
or one for all (``"scalar"``): ``log Z(d) = -d |theta|^2 / 2 + P log d / 2 - sum_i log(l_i + d) / 2``
over the eigenvalues ``l_i`` of ``H`` (the diagonal entries for a diagonal site), whose
maximiser is the root of a decreasing function, found by safeguarded Newton steps. A prior centred on the
pretrained weights would have no maximiser (the evidence grows with ``d`` without bound).

Sites outside ``include`` keep (numerically) no spread: the model is a last-layer Laplace.
Correlations of a "full" site are not kept when sampling (the variational family is
mean-field): its marginal variances are those of the full Laplace posterior, not ``1/diag``.

Example::

    >>> bnn = bf.bayesify(model)
    >>> bf.laplace(bnn, train_loader)                  # the spreads are now the Laplace posterior's
    >>> bf.calibrate(bnn, val_loader)                 # optional: temperature on held-out data
    >>> pred = bf.predict(bnn, x_test, linearized=True)
"""

from __future__ import annotations

import fnmatch
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._choices import lookup
from . import _backprop_ggn as _bp
from ._linearize import at_means, mean_output
from .loss import LIKELIHOODS, first_tensor
from .module import VIModule, _vmap_cause
from .sites import Site, iter_sites
from .variational import MeanFieldNormal, inverse_softplus

__all__ = ["laplace", "LaplaceResult", "CURVATURES", "STRUCTURES"]

CURVATURES = {"auto": "auto", "ggn": "ggn", "fisher": "ggn", "exact": "ggn", "mc": "mc", "mc_fisher": "mc"}
#: ``curvature="auto"``: the exact GGN up to this many loss-Hessian columns per example (classes x
#: positions; one backward each), the MC Fisher (one column) beyond.
AUTO_EXACT_COLUMNS = 16
STRUCTURES = {"diag": "diag", "diagonal": "diag", "full": "full"}
METHODS = {"auto": "auto", "backprop": "backprop", "per_example": "per_example", "func": "per_example"}
#: Largest site (elements) whose full curvature matrix is formed (``structure="full"``).
MAX_FULL = 8192
#: Spread of the sites outside ``include`` (a point mass in all but name).
NO_SPREAD = 1e-12
#: Candidates of ``prior_precision="val"``.
VAL_PRECISIONS = tuple(float(v) for v in torch.logspace(-2, 6, 17, dtype=torch.float64))
#: Memory for one vmapped chunk of per-example Jacobians (elements).
_CHUNK_ELEMENTS = 2 ** 26
_TARGET_KEYS = ("labels", "label")


@dataclass
class LaplaceResult:
    """What :func:`laplace` computed. ``curvature``: per site, the summed GGN diagonal (or, for a
    "full" site, its eigenvalues and eigenvectors); ``prior_precision`` per site; ``variance``
    set per site. Call :meth:`apply` to set the spreads again for another prior precision."""

    likelihood: str
    curvature_type: str
    n_examples: int
    prior_precision: dict[str, float]
    log_evidence: float
    seconds: float
    noise_std: float | None = None
    #: How the curvature was computed: "backprop", "per_example", or "last_linear" (a last Linear
    #: in closed form from its inputs); several joined by "+" where the route changed mid-pass.
    method: str = ""
    curvature: dict[str, Any] = field(default_factory=dict, repr=False)
    structure: dict[str, str] = field(default_factory=dict, repr=False)

    def apply(self, bnn: VIModule, prior_precision: dict[str, float] | float | None = None) -> None:
        """Set ``bnn``'s spreads from this curvature again, e.g. for another prior precision."""
        apply(bnn, self, prior_precision)

    def variance(self, name: str, prior_precision: float) -> Tensor:
        """Posterior variance of site ``name`` for a prior precision."""
        c = self.curvature[name]
        if self.structure[name] == "full":
            evals, evecs, shape = c
            return ((evecs ** 2) / (evals.clamp_min(0) + prior_precision)).sum(1).reshape(shape)
        return 1.0 / (c.clamp_min(0) + prior_precision)


# -- inputs -------------------------------------------------------------------------------------------
def _split(batch: Any, where: str) -> tuple[tuple, dict, Tensor | None]:
    """``(args, kwargs, target)`` of one batch: a tensor, a mapping (``labels`` is the target),
    or a tuple ``(x, y, ...)``."""
    target = None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{where} is an empty {type(batch).__name__}; expected (x, y) or x")
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        batch = batch[0]
    if isinstance(batch, Tensor):
        return (batch,), {}, target
    if isinstance(batch, Mapping):
        for k in _TARGET_KEYS:
            if isinstance(batch.get(k), Tensor):
                target = batch[k]
        return (), {k: v for k, v in batch.items() if k not in _TARGET_KEYS}, target
    raise TypeError(f"{where} must be a tensor, a mapping of model inputs or a tuple (x, y, ...), "
                    f"got {type(batch).__name__}")


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) and x.device != device else x


def _iterate(data: Any) -> tuple[Iterable[Any], int | None]:
    if isinstance(data, (Tensor, Mapping, tuple)):
        return [data], 1
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader (or any iterable of batches), a tensor, a mapping or a "
                        f"tuple (x, y), got {type(data).__name__}")
    try:
        return data, len(data)  # type: ignore[arg-type]
    except TypeError:
        return data, None


@contextmanager
def _progress(enabled: bool, total: int | None, what: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)


# -- site selection -----------------------------------------------------------------------------------
def _module_name(root: nn.Module, site: Site) -> str:
    """The site's module name as in the point model (without ``BayesianModel``'s ``model.``)."""
    mod = site.qualname.rsplit(".", 1)[0] if "." in site.qualname else ""
    if getattr(root, "conversion", None) is not None and (mod == "model" or mod.startswith("model.")):
        mod = mod[len("model."):] if mod != "model" else ""
    return mod


def _matches(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def _last_layer(root: nn.Module, sites: list[Site], args: tuple, kwargs: dict) -> list[Site]:
    """The sites of the last module that holds sites to run in the forward (by a hooked call)."""
    owners = {id(s.module): s.module for s in sites}
    order: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(id(m))) for m in owners.values()]
    try:
        with torch.no_grad(), at_means(root):
            root(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError("include='last_layer': no Bayesian module ran in the model's forward")
    return [s for s in sites if id(s.module) == order[-1]]


def _patterns(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{what} must be a glob pattern or a list of them (module names, e.g. 'classifier' or "
                    f"'layer4.*'), got {value!r}")


# -- per-example curvature ----------------------------------------------------------------------------
def _rows_fn(root: nn.Module, kind: str, curvature: str, spec: Any, batched: list[bool]
             ) -> Callable[[dict[str, Tensor], list[Any], Tensor | None], Tensor]:
    """``rows(params, leaves, y)`` for one example: the vector whose Jacobian ``R`` satisfies
    ``R^T R = J^T Lambda J`` (or the MC Fisher's single row)."""
    def rows(params: dict[str, Tensor], leaves: list[Any], y: Tensor | None) -> Tensor:
        one = [x.unsqueeze(0) if b else x for x, b in zip(leaves, batched)]
        args, kwargs = tree_unflatten(one, spec)
        out = mean_output(root, params, args, kwargs)
        if kind == "normal":
            return out.reshape(-1)
        logits = out.reshape(-1, out.shape[-1])
        logp = torch.log_softmax(logits, -1)
        if curvature == "mc":
            return logp.gather(1, y.reshape(-1, 1)).sum().reshape(1)
        p = logp.detach().exp()
        return (p.sqrt() * (logits - (p * logits).sum(-1, keepdim=True))).reshape(-1)
    return rows


def _per_example(rows: Callable, full: set[str]) -> Callable:
    """Per example: ``{site: sum of squared rows}`` (diagonal) or the rows ``(K, P)`` (full)."""
    def one(params: dict[str, Tensor], leaves: list[Any], y: Tensor | None) -> dict[str, Tensor]:
        jac = torch.func.jacrev(rows)(params, leaves, y)
        return {k: j.reshape(j.shape[0], -1) if k in full else j.square().sum(0) for k, j in jac.items()}
    return one


def _accumulate(total: dict[str, Tensor], per: dict[str, Tensor], full: set[str], batched_out: bool) -> None:
    for k, v in per.items():
        v = v.detach()
        if k in full:
            r = v if batched_out else v.unsqueeze(0)
            add = torch.einsum("bkp,bkq->pq", r, r)
        else:
            add = v.sum(0) if batched_out else v
        total[k] = add if k not in total else total[k] + add


def _head_curvature(sums: dict[str, Tensor], sites: list[Site], a: Tensor, out: Tensor, kind: str,
                    full: set[str]) -> None:
    """The GGN of a last Linear layer ``out = a W^T + b`` from its input ``a`` ``(B, in)`` alone
    (``J`` of row ``c`` is ``e_c (x) a``): diagonal ``sum_n Lambda_n,cc a_n^2``, full block
    ``sum_n Lambda_n (x) a_n a_n^T``; ``Lambda = diag(p) - p p^T`` (categorical) or ``I`` (normal;
    divided by the noise variance later). One forward pass, no per-example Jacobians."""
    a = a.detach()
    if kind == "categorical":
        o = out.detach()
        p = torch.softmax(o if o.dtype in (torch.float32, torch.float64) else o.float(), -1).to(a.dtype)
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    else:
        lam = torch.eye(out.shape[-1], dtype=a.dtype, device=a.device).expand(a.shape[0], -1, -1)
    for s in sites:
        if s.name == "weight":
            if s.qualname in full:
                c, i = s.mean.shape
                add = torch.einsum("bcd,bi,bj->cidj", lam, a, a).reshape(c * i, c * i)
            else:
                add = torch.diagonal(lam, dim1=-2, dim2=-1).T @ a.square()
        else:
            add = lam.sum(0) if s.qualname in full else torch.diagonal(lam, dim1=-2, dim2=-1).sum(0)
        sums[s.qualname] = add if s.qualname not in sums else sums[s.qualname] + add


# -- prior precision ----------------------------------------------------------------------------------
def _precision_root(evals: list[Tensor], sqnorm: float) -> float:
    """The ``d`` where ``g(d) = d/dd log Z = P / d - sum 1 / (l + d) - sqnorm = 0`` over the ``P``
    eigenvalues ``l`` (``g`` decreases in ``d``): safeguarded Newton in ``t = log d`` on the bracket
    [1e-8, 1e8] (a bisection step wherever Newton would leave it); ~10 passes over the eigenvalues."""
    e = torch.cat([v.reshape(-1) for v in evals]).double()
    count = e.numel()
    e = e[e > 0]  # zero eigenvalues (e.g. embedding rows the data never looks up) in closed form
    zeros = count - e.numel()
    lo, hi = math.log(1e-8), math.log(1e8)
    t = min(max(math.log(count / sqnorm) if sqnorm > 0 else hi, lo), hi)
    for _ in range(100):
        d = math.exp(t)
        r = torch.reciprocal(e + d)
        g = (count - zeros) / d - float(r.sum()) - sqnorm
        if g > 0:
            lo = t
        else:
            hi = t
        # dg/dt = d g'(d) = -P / d + d sum 1 / (l + d)^2 = -(P - zeros) / d + d sum_{l > 0} 1 / (l + d)^2 (< 0)
        slope = -(count - zeros) / d + d * float(r.square().sum())
        step = t - g / slope if slope < 0 else 0.5 * (lo + hi)
        new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(new - t) < 1e-12 or hi - lo < 1e-12:
            return math.exp(new)
        t = new
    return math.exp(t)


def _log_evidence_terms(evals: Tensor, sqnorm: float, d: float) -> float:
    n = evals.numel()
    return -0.5 * d * sqnorm + 0.5 * n * math.log(d) - 0.5 * float(torch.log(evals + d).sum())


# -- public -------------------------------------------------------------------------------------------
def laplace(
    bnn: VIModule,
    data: Any,
    likelihood: str = "categorical",
    *,
    include: str | list[str] | None = None,
    structure: dict[str, str] | None = None,
    curvature: str = "auto",
    prior_precision: float | str = "marglik",
    prior_structure: str = "site",
    val_data: Any = None,
    noise_std: float | None = None,
    dataset_size: int | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    method: str = "auto",
) -> LaplaceResult:
    """Set every site's spread to the Laplace posterior around its current mean (in place).

    Args:
        bnn: a model from ``bf.bayesify`` (or a hand-written ``bf.VIModule``) with a
            ``MeanFieldNormal`` posterior; its means are kept.
        data: a DataLoader (or any iterable) of batches: ``(x, y)``, ``x``, or a mapping of model
            inputs (Hugging Face; ``labels`` is dropped). Labels are not needed for
            classification (the GGN uses the model's own probabilities).
        likelihood: ``"categorical"`` (logits over the last dimension) or ``"normal"``.
        include: module-name globs (as in the point model, e.g. ``"classifier"``) whose sites get
            the Laplace posterior, or ``"last_layer"`` (the last Bayesian module the forward runs);
            every other site is set to no spread. Default: all sites.
        structure: ``{module glob: "diag" | "full"}``; "full" forms the site's whole GGN (sites of
            at most ``MAX_FULL`` elements) and sets the exact marginal variances of the full posterior.
        curvature: ``"ggn"`` (exact GGN diagonal; categorical: C gradients per example), ``"mc"``
            (Monte Carlo Fisher, one sampled label per example: one gradient per example), or
            ``"auto"`` (default): exact up to ``AUTO_EXACT_COLUMNS`` = 16 outputs per example
            (classes x positions) and for ``likelihood="normal"``, MC beyond (language models, token
            classification). ``LaplaceResult.curvature_type`` says which ran.
        prior_precision: ``"marglik"`` (Laplace marginal likelihood), ``"val"`` (one precision for all
            sites, the candidate of ``VAL_PRECISIONS`` with the lowest NLL of the linearised
            predictive on ``val_data``) or a positive number.
        prior_structure: ``"site"`` (one precision per site) or ``"scalar"`` (one for all), for marglik.
        val_data: held-out ``(x, y)`` batches for ``prior_precision="val"``.
        noise_std: observation noise for ``likelihood="normal"`` (default: from the residuals, which
            needs targets in the batches).
        dataset_size: scale the curvature to this many examples (default: the examples seen).
        chunk_size: examples per vectorised Jacobian call (default: from a memory budget).
        generator: for the labels of ``curvature="mc"``.
        progress: a rich progress bar on stderr.
        method: how the per-example curvature is computed: ``"backprop"`` (one forward recording each
            site module's input, one backward per loss-Hessian column, each site's per-example
            gradients in closed form: ``bayesify._backprop_ggn``), ``"per_example"`` (``torch.func``
            per-example Jacobians of the whole network; the reference), or ``"auto"`` (default):
            backprop where it applies (checked against plain autograd on two examples of the first batch),
            else per example. Both give the same numbers.
    """
    t0 = time.perf_counter()
    if not isinstance(bnn, VIModule):
        raise TypeError(f"laplace expects a bayesify model (bf.bayesify(model)), got {type(bnn).__name__}")
    kind = lookup("likelihood", likelihood, LIKELIHOODS)
    curv = lookup("curvature", curvature, CURVATURES)
    if curv == "mc" and kind != "categorical":
        raise ValueError("curvature='mc' applies to likelihood='categorical'; the normal GGN is exact and as cheap")
    pstruct = lookup("prior_structure", prior_structure, {"site": "site", "scalar": "scalar", "layer": "site"})
    if isinstance(prior_precision, str):
        if prior_precision not in ("marglik", "val"):
            raise ValueError(f"prior_precision must be 'marglik', 'val' or a positive number, got {prior_precision!r}")
        if prior_precision == "val" and val_data is None:
            raise ValueError("prior_precision='val' needs val_data= (held-out batches with labels)")
    elif isinstance(prior_precision, bool) or not isinstance(prior_precision, (int, float)) or not (
            prior_precision > 0 and math.isfinite(prior_precision)):
        raise ValueError(f"prior_precision must be 'marglik', 'val' or a positive number, got {prior_precision!r}")
    if noise_std is not None and (isinstance(noise_std, bool) or not isinstance(noise_std, (int, float))
                                  or not noise_std > 0):
        raise ValueError(f"noise_std must be a positive number or None, got {noise_std!r}")
    if noise_std is not None and kind != "normal":
        raise ValueError("noise_std applies only to likelihood='normal'")
    if dataset_size is not None and (isinstance(dataset_size, bool) or not isinstance(dataset_size, int)
                                     or dataset_size < 1):
        raise ValueError(f"dataset_size must be a positive int or None, got {dataset_size!r}")
    route = lookup("method", method, METHODS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    all_sites = list(iter_sites(bnn))
    if not all_sites:
        raise ValueError("the model has no Bayesian sites; convert it with bf.bayesify(model) first")
    for s in all_sites:
        if type(s.spec.variational) is not MeanFieldNormal:
            raise ValueError(f"laplace sets the spreads of a MeanFieldNormal posterior; site {s.qualname} has "
                             f"{s.spec.variational!r}: convert with variational='meanfield'")
    if isinstance(structure, str):  # one structure for every selected site
        structure = {"*": structure}
    elif structure is not None and not isinstance(structure, Mapping):
        raise TypeError(f"structure must be {{module glob: 'diag' | 'full'}} or one of those names, "
                        f"got {type(structure).__name__}")
    structure = dict(structure or {})
    for pat, val in structure.items():
        if not isinstance(pat, str):
            raise TypeError(f"structure keys must be module-name globs, got {pat!r}")
        lookup("structure", val, STRUCTURES)
    batches, total = _iterate(data)
    device = all_sites[0].mean.device

    modes = [(m, m.training) for m in bnn.modules()]
    # torch.func differentiates the means it is given; autograd recording the model's own
    # parameters on top would only cost time and memory.
    grads = [(p, p.requires_grad) for p in bnn.parameters()]
    bnn.eval()
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with at_means(bnn):
            result = _run(bnn, batches, total, kind, curv, include, structure, prior_precision, pstruct, noise_std,
                          dataset_size, chunk_size, generator, progress, all_sites, device, t0, route)
        if prior_precision == "val":
            from .calibrate import select_prior_precision

            select_prior_precision(bnn, result, val_data, VAL_PRECISIONS, generator)
            result.seconds = time.perf_counter() - t0
        return result
    finally:
        for m, mode in modes:
            m.training = mode
        for p, req in grads:
            p.requires_grad_(req)


def _run(bnn: VIModule, batches: Iterable[Any], total: int | None, kind: str, curv: str, include: Any,
         structure: dict[str, str], prior_precision: float | str, pstruct: str, noise_std: float | None,
         dataset_size: int | None, chunk_size: int | None, generator: torch.Generator | None, progress: bool,
         all_sites: list[Site], device: torch.device, t0: float, route: str = "auto") -> LaplaceResult:
    chosen: list[Site] | None = None
    head: nn.Module | None = None  # a Linear whose output is the prediction: closed-form GGN (_head_curvature)
    full: set[str] = set()
    struct_of: dict[str, str] = {}
    sums: dict[str, Tensor] = {}
    n_seen = 0
    sq_resid = 0.0
    n_resid = 0
    state = {"vmap_ok": True, "warned": False}
    used: list[str] = []
    use_bp = route != "per_example"  # the backprop route, until it does not apply
    verified = False  # checked against autograd (method="auto") and run once
    with _progress(progress, total, "laplace") as advance:
        for i, batch in enumerate(batches):
            args, kwargs, target = _split(batch, f"batch {i}")
            args = tuple(_to(a, device) for a in args)
            kwargs = {k: _to(v, device) for k, v in kwargs.items()}
            if chosen is None:
                chosen, full, struct_of = _select(bnn, all_sites, include, structure, args, kwargs)
                params = {s.qualname: s.mean.detach() for s in chosen}
                numel = sum(p.numel() for p in params.values())
                owners = {id(s.module) for s in chosen}
                head = (chosen[0].module if curv in ("ggn", "auto") and len(owners) == 1 and use_bp
                        and isinstance(chosen[0].module, nn.Linear) and {s.name for s in chosen} <= {"weight", "bias"}
                        else None)
                if head is None and use_bp:
                    try:
                        _bp.check_sites(bnn, chosen)
                    except _bp.Unsupported as exc:
                        use_bp = _no_backprop(route, str(exc))
            leaves, spec = tree_flatten((args, kwargs))
            bsz = next((x.shape[0] for x in leaves if isinstance(x, Tensor) and x.dim() > 0), None)
            if bsz is None:
                raise ValueError(f"batch {i} has no tensor with a batch dimension")
            batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == bsz for x in leaves]
            head_io: list[tuple[Tensor, Tensor]] = []
            cap = None
            if head is None and use_bp:
                try:
                    with at_means(bnn):
                        out, cap = _bp.forward_captured(bnn, chosen, args, kwargs, bsz)
                except _bp.Unsupported as exc:
                    use_bp, cap = _no_backprop(route, str(exc)), None
                except (RuntimeError, ValueError, TypeError) as exc:
                    if route != "auto" or verified:
                        raise
                    # e.g. a batch-1 output the route expanded; the per-example route reruns the batch
                    # (an error there is the model's own and propagates)
                    use_bp, cap = False, None
            if cap is None:
                hook = (head.register_forward_hook(lambda m, i, o: head_io.append((i[0], o)))
                        if head is not None else None)
                try:
                    with torch.no_grad(), at_means(bnn):
                        out = first_tensor(bnn(*args, **kwargs))
                finally:
                    if hook is not None:
                        hook.remove()
            if head is not None:
                # The shortcut holds only where the head's output *is* the prediction, from 2-d input.
                if len(head_io) == 1 and head_io[0][1] is out and head_io[0][0].dim() == 2 and out.dim() == 2:
                    _head_curvature(sums, chosen, head_io[0][0], out, kind, full)
                    used.append("last_linear")
                else:
                    head = None  # the general routes from here on (they compute the same quantity)
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"batch {i}: the model's output at the posterior means is not finite (NaN or inf); "
                                 "check the inputs and the weights")
            if target is not None and target.dim() > 0 and target.shape[0] != bsz:
                raise ValueError(f"batch {i}: {target.shape[0]} targets for {bsz} examples; pass (x, y) with one "
                                 "target per example")
            if curv == "auto":  # decided once, on the first batch
                curv = "ggn" if (head is not None or kind == "normal" or out[0].numel() <= AUTO_EXACT_COLUMNS) else "mc"
            y = None
            if curv == "mc":
                logits = out.detach().reshape(bsz, -1, out.shape[-1])
                y = torch.multinomial(torch.softmax(logits.reshape(-1, out.shape[-1]).float(), -1), 1,
                                      generator=generator).reshape(bsz, -1)
            if kind == "normal" and noise_std is None:
                if target is None:
                    raise ValueError("likelihood='normal' without noise_std needs targets in the batches "
                                     "((x, y) tuples) to estimate the noise; or pass noise_std=")
                sq_resid += float((out.detach() - _to(target, device).reshape(out.shape)).square().sum())
                n_resid += out.numel()
            if head is not None:
                n_seen += bsz
                advance()
                continue
            k_rows = 1 if curv == "mc" else out[0].numel()
            if cap is not None:
                local: dict[str, Tensor] = {}
                try:
                    if route == "auto" and not verified:
                        _check_backprop(bnn, chosen, leaves, spec, batched, full)
                    with at_means(bnn):
                        _bp.batch_curvature(local, chosen, out, cap, kind, curv, y, full)
                    verified = True
                    used.append("backprop")
                except _bp.Unsupported as exc:
                    use_bp, cap = _no_backprop(route, str(exc)), None
                else:
                    for q, v in local.items():
                        sums[q] = v if q not in sums else sums[q] + v
                del out, local
            if cap is None:
                _per_example_sums(sums, bnn, params, leaves, spec, batched, y, kind, curv, full,
                                  chunk_size or max(1, _CHUNK_ELEMENTS // max(1, k_rows * numel)), state)
                used.append("per_example")
            n_seen += bsz
            advance()
    if chosen is None:
        raise ValueError("data yielded no batches; the curvature pass needs the training data")
    scale = 1.0 if dataset_size is None else dataset_size / n_seen
    sigma = noise_std
    if kind == "normal":
        if sigma is None:
            sigma = math.sqrt(sq_resid / max(n_resid, 1)) or 1.0
        scale /= sigma ** 2
    curvature: dict[str, Any] = {}
    evals: dict[str, Tensor] = {}
    for s in chosen:
        h = sums[s.qualname].double() * scale
        if s.qualname in full:
            e, v = torch.linalg.eigh(h)
            e = e.clamp_min(0)
            curvature[s.qualname] = (e, v, tuple(s.mean.shape))
            evals[s.qualname] = e
        else:
            h = h.clamp_min(0)
            curvature[s.qualname] = h
            evals[s.qualname] = h.reshape(-1)
    sqn = {s.qualname: float(s.mean.detach().double().square().sum()) for s in chosen}
    if prior_precision == "marglik":
        if pstruct == "scalar":
            d = _precision_root(list(evals.values()), sum(sqn.values()))
            precision = {q: d for q in evals}
        else:
            precision = {q: _precision_root([e], sqn[q]) for q, e in evals.items()}
    elif prior_precision == "val":
        precision = {q: 1.0 for q in evals}  # chosen after the pass (select_prior_precision)
    else:
        precision = {q: float(prior_precision) for q in evals}
    log_ev = sum(_log_evidence_terms(evals[q], sqn[q], precision[q]) for q in evals)
    result = LaplaceResult(likelihood=kind, curvature_type=curv, n_examples=n_seen, prior_precision=precision,
                           log_evidence=log_ev, seconds=0.0, noise_std=sigma, curvature=curvature,
                           method="+".join(dict.fromkeys(used)),
                           structure=struct_of)
    apply(bnn, result)
    # The predictive under which a Laplace posterior is meant to be used (bf.predict's default now).
    # New spreads: an earlier calibration no longer applies.
    bnn.predictive = {"linearized": True}
    result.seconds = time.perf_counter() - t0
    return result


def _no_backprop(route: str, why: str) -> bool:
    """False: the per-example route from here on (``method="backprop"`` asked for the fast route: an error)."""
    if route == "backprop":
        raise ValueError(f"laplace(method='backprop') does not apply to this model: {why}; use method='auto'")
    return False


def _per_example_sums(sums: dict[str, Tensor], bnn: VIModule, params: dict[str, Tensor], leaves: list[Any],
                      spec: Any, batched: list[bool], y: Tensor | None, kind: str, curv: str, full: set[str],
                      chunk: int, state: dict[str, Any], warn: bool = True) -> None:
    """The reference route: per-example Jacobians of the whole network (``torch.func``), vmapped
    over the examples, or example by example where vmap cannot run the model."""
    one = _per_example(_rows_fn(bnn, kind, curv, spec, batched), full)
    bsz = next(x.shape[0] for x, b in zip(leaves, batched) if b)
    with at_means(bnn):
        if state["vmap_ok"]:
            try:
                in_dims = ([0 if b else None for b in batched],)
                per = torch.vmap(one, in_dims=(None, *in_dims, 0 if y is not None else None),
                                 chunk_size=chunk)(params, leaves, y)
                _accumulate(sums, per, full, True)
                return
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
                # Retried example by example: an error there is the model's own and
                # propagates; only a loop that succeeds makes this a vmap limit.
                state["vmap_ok"], state["why"] = False, _vmap_cause(exc)[0]
        for j in range(bsz):
            ex = [x[j] if b else x for x, b in zip(leaves, batched)]
            _accumulate(sums, one(params, ex, None if y is None else y[j]), full, False)
        if warn and not state["warned"]:
            state["warned"] = True
            warnings.warn(f"laplace: torch.vmap cannot run this model over examples ({state['why']}); "
                          "computing the curvature example by example (slower, same result)",
                          RuntimeWarning, stacklevel=4)


#: Examples of the first batch on which ``method="auto"`` checks the backprop route against plain
#: autograd, example by example (a model that breaks an assumption of the fast route, e.g. a batch
#: dimension that is not the first or a parameter read outside its module's forward, is caught
#: there and takes the per-example route).
_CHECK_EXAMPLES = 2


def _check_backprop(bnn: VIModule, chosen: list[Site], leaves: list[Any], spec: Any, batched: list[bool],
                    full: set[str]) -> None:
    """For one random output direction ``v`` per example: the backprop route's sum over the first
    examples of the squared per-example gradients of ``v . f`` equals the one plain autograd gives,
    one example at a time (the whole network, every use of every parameter)."""
    n = min(_CHECK_EXAMPLES, next(x.shape[0] for x, b in zip(leaves, batched) if b))
    args, kwargs = tree_unflatten([x[:n] if b else x for x, b in zip(leaves, batched)], spec)
    fast: dict[str, Tensor] = {}
    with at_means(bnn):
        out, cap = _bp.forward_captured(bnn, chosen, args, kwargs, n)
        gen = torch.Generator(device=out.device).manual_seed(0)
        v = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
        _bp.batch_curvature(fast, chosen, out, cap, "normal", "ggn", None, full, cols=v.unsqueeze(0))
        del out, cap
        ref: dict[str, Tensor] = {}
        means = [s.mean for s in chosen]
        flags = [p.requires_grad for p in means]
        try:
            for p in means:
                p.requires_grad_(True)
            for i in range(n):
                a, kw = tree_unflatten([x[i:i + 1] if b else x for x, b in zip(leaves, batched)], spec)
                with torch.enable_grad():
                    o = first_tensor(bnn(*a, **kw))
                    if o.shape != v[i:i + 1].shape:
                        raise _bp.Unsupported(f"the model's output for one example has shape {tuple(o.shape)}")
                    grads = torch.autograd.grad(o, means, v[i:i + 1], allow_unused=True)
                for s, gr in zip(chosen, grads):
                    gr = torch.zeros_like(s.mean) if gr is None else gr.detach()
                    add = torch.outer(gr.reshape(-1), gr.reshape(-1)) if s.qualname in full else gr.square()
                    ref[s.qualname] = add if s.qualname not in ref else ref[s.qualname] + add
        finally:
            for p, req in zip(means, flags):
                p.requires_grad_(req)
    # Absolute tolerance from the largest entry of all sites: some sites' gradients are zero but for
    # rounding (e.g. an attention key bias: softmax ignores a shift shared by all keys).
    top = max(float(r.abs().max()) for r in ref.values())
    for q, r in ref.items():
        f = fast.get(q, torch.zeros_like(r))
        tol = 1e-6 if r.dtype == torch.float64 else 1e-3
        if not torch.allclose(f.to(r.dtype), r, rtol=tol, atol=tol * top + 1e-30):
            raise _bp.Unsupported(f"its per-example gradients of {q} differ from autograd's on the first examples")


def _select(bnn: VIModule, sites: list[Site], include: Any, structure: dict[str, str], args: tuple,
            kwargs: dict) -> tuple[list[Site], set[str], dict[str, str]]:
    if include is None:
        chosen = sites
    elif include == "last_layer":
        chosen = _last_layer(bnn, sites, args, kwargs)
    else:
        pats = _patterns(include, "include")
        chosen = [s for s in sites if _matches(_module_name(bnn, s), pats)]
        if not chosen:
            names = sorted({_module_name(bnn, s) for s in sites})
            raise ValueError(f"include={include!r} matched no Bayesian module; modules with sites: "
                             f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    struct_of = {}
    for s in chosen:
        kind = "diag"
        for pat, val in structure.items():
            if _matches(_module_name(bnn, s), [pat]):
                kind = lookup("structure", val, STRUCTURES)
        if kind == "full" and s.mean.numel() > MAX_FULL:
            raise ValueError(f"structure 'full' for {s.qualname}: {s.mean.numel()} elements, more than "
                             f"MAX_FULL={MAX_FULL}; use 'diag' for it or restrict the pattern")
        struct_of[s.qualname] = kind
    for pat in structure:
        if not any(_matches(_module_name(bnn, s), [pat]) for s in chosen):
            warnings.warn(f"structure pattern {pat!r} matched no selected site", UserWarning, stacklevel=4)
    full = {q for q, k in struct_of.items() if k == "full"}
    return chosen, full, struct_of


@torch.no_grad()
def apply(bnn: VIModule, result: LaplaceResult, prior_precision: dict[str, float] | float | None = None) -> None:
    """Set the spreads from ``result`` (optionally for another prior precision); sites that
    ``result`` does not cover get no spread."""
    if prior_precision is not None:
        result.prior_precision = ({q: float(prior_precision) for q in result.prior_precision}
                                  if isinstance(prior_precision, (int, float)) else dict(prior_precision))
    # "full" sites: the covariance factor U (Sigma = U U^T) that the linearised predictive draws
    # from; kept in the model (bf.save / bf.load keep it).
    factors = {}
    for q, kind in result.structure.items():
        if kind == "full":
            evals, evecs, _ = result.curvature[q]
            u = evecs / (evals.clamp_min(0) + result.prior_precision[q]).sqrt()
            site_mean = dict((s.qualname, s.mean) for s in iter_sites(bnn))[q]
            factors[q] = u.to(device=site_mean.device, dtype=site_mean.dtype)
    bnn.posterior_factors = factors
    for s in iter_sites(bnn):
        rho = getattr(s.module, f"{s.name}_rho")
        if s.qualname in result.curvature:
            std = result.variance(s.qualname, result.prior_precision[s.qualname]).sqrt()
        else:
            std = torch.full(rho.shape, NO_SPREAD, dtype=torch.float64)
        rho.copy_(inverse_softplus(std.to(device=rho.device, dtype=torch.float64)).to(rho.dtype))
