"""The block-seeded noise kernel (bayesify._normal): reproducible, thread-count independent,
and the regenerating backward equals autograd through ``mean + std * eps``."""

from __future__ import annotations

import pytest
import torch

from bayesify import _normal
from bayesify._normal import BLOCK, meanfield_draw, standard_normal
from tests.models import torch_threads


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SHAPES = [(3,), (7, 5), (BLOCK // 2 + 3, 3), (4, BLOCK // 3 + 1)]  # one block ... several column chunks


@pytest.mark.parametrize("shape", SHAPES)
def test_noise_is_standard_normal_and_reproducible(shape):
    a = standard_normal((6, *shape), torch.float32, torch.device("cpu"), _gen(1))
    b = standard_normal((6, *shape), torch.float32, torch.device("cpu"), _gen(1))
    c = standard_normal((6, *shape), torch.float32, torch.device("cpu"), _gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    if a.numel() > 10_000:
        assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 1) < 0.01
    # different samples and different blocks get different noise
    assert not torch.equal(a[0], a[1])


def test_noise_does_not_depend_on_the_thread_count():
    shape = (5, 2 * BLOCK + 17)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = standard_normal(shape, torch.float32, torch.device("cpu"), _gen(3))
        torch.set_num_threads(2)
        two = standard_normal(shape, torch.float32, torch.device("cpu"), _gen(3))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loc", ["tensor", 0.25, None])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["recover", "regenerate"])
@pytest.mark.parametrize("n", [4, 1])
def test_backward_equals_autograd(shape, loc, threads, path, n):
    # "recover": every std >= RECOVER_RATIO * |mean|, backward recomputes eps from the sample;
    # "regenerate": one tiny std, backward redraws eps from the block seeds.
    torch.manual_seed(0)
    with torch_threads(threads):
        mean = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        rho = torch.randn(shape, dtype=torch.float64).sub_(2)
        if path == "regenerate":
            rho.view(-1)[-1] = -30.0  # std ~ 1e-13
        rho.requires_grad_()
        lc = torch.randn(shape, dtype=torch.float64) if loc == "tensor" else loc
        g_out = torch.randn(n, *shape, dtype=torch.float64)
        g_quad = torch.randn(n, dtype=torch.float64)

        g_log = 0.7
        w, quad, sq, log_std = meanfield_draw(mean, rho, lc, n, _gen(5))
        loss = (w * g_out).sum() + (0 if quad is None else (quad * g_quad).sum() + g_log * log_std)
        gm, gr = torch.autograd.grad(loss, (mean, rho))

        eps = standard_normal((n, *shape), torch.float64, torch.device("cpu"), _gen(5))
        std2 = torch.nn.functional.softplus(rho)
        w2 = torch.addcmul(mean, std2, eps)  # w = mean + std * eps, one rounding (FMA)
        assert torch.equal(w.detach(), w2.detach())  # same noise, same arithmetic
        loss2 = (w2 * g_out).sum()
        if lc is not None:
            dims = tuple(range(1, w2.dim()))
            quad2 = (w2 - lc).square().sum(dims)
            torch.testing.assert_close(quad, quad2)
            torch.testing.assert_close(sq, eps.square().sum(dims))
            torch.testing.assert_close(log_std, std2.log().sum())
            loss2 = loss2 + (quad2 * g_quad).sum() + g_log * std2.log().sum()
        gm2, gr2 = torch.autograd.grad(loss2, (mean, rho))
        torch.testing.assert_close(gm, gm2)
        torch.testing.assert_close(gr, gr2)


@pytest.mark.parametrize("shape", [(), (7, 5), (4, BLOCK // 3 + 1)])
def test_one_sample_backward_with_a_strided_gradient(shape):
    # One sample, the incoming gradient a transpose (as the vmapped F.linear's weight gradient):
    # the one-sample backward reads it as it comes, and equals autograd through mean + std * eps.
    torch.manual_seed(1)
    mean = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(shape, dtype=torch.float64).sub_(2).requires_grad_()
    g_out = torch.randn(1, *shape[::-1], dtype=torch.float64)
    w, *_ = meanfield_draw(mean, rho, None, 1, _gen(3))
    gm, gr = torch.autograd.grad((w.transpose(-1, -2) if w.dim() > 2 else w).mul(g_out).sum(), (mean, rho))
    eps = standard_normal((1, *shape), torch.float64, torch.device("cpu"), _gen(3))
    w2 = torch.addcmul(mean, torch.nn.functional.softplus(rho), eps)
    assert torch.equal(w.detach(), w2.detach())
    gm2, gr2 = torch.autograd.grad((w2.transpose(-1, -2) if w2.dim() > 2 else w2).mul(g_out).sum(), (mean, rho))
    torch.testing.assert_close(gm, gm2)
    torch.testing.assert_close(gr, gr2)


def test_no_grad_draw_equals_grad_draw():
    mean, rho = torch.randn(9, BLOCK // 4), torch.randn(9, BLOCK // 4)
    with torch.no_grad():
        a = meanfield_draw(mean, rho, None, 3, _gen(8))[0]
    b = meanfield_draw(mean.requires_grad_(), rho, None, 3, _gen(8))[0]
    assert torch.equal(a, b.detach())


def test_bfloat16_and_empty():
    mean = torch.randn(64, 33, dtype=torch.bfloat16, requires_grad=True)
    w, quad, sq, _ = meanfield_draw(mean, torch.full_like(mean, -2.0), 0.0, 3, _gen(0))
    assert w.dtype == torch.bfloat16 and quad.shape == (3,)
    (w.float().sum() + quad.float().sum()).backward()
    assert torch.isfinite(mean.grad.float()).all()
    e = torch.zeros(0, 4, requires_grad=True)
    assert meanfield_draw(e, e.detach() + 1, 0.0, 2, None)[0].shape == (2, 0, 4)


def test_pool_survives_thread_count_changes():
    prev = torch.get_num_threads()
    try:
        for t in (2, 1, 2):
            torch.set_num_threads(t)
            assert _normal.run_parallel([lambda i=i: i * i for i in range(5)]) == [0, 1, 4, 9, 16]
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("shape", [(BLOCK // 64 + 5, 96), (3, 40, 7, BLOCK // 256)])
def test_strided_incoming_gradient(shape):
    # F.linear's weight gradient under vmap arrives as a transpose; blocks read it by rows.
    torch.manual_seed(1)
    with torch_threads(2):
        mean = torch.randn(shape, requires_grad=True)
        rho = torch.randn(shape).requires_grad_()
        g_out = torch.randn(2, *reversed(shape)).permute(0, *range(len(shape), 0, -1))
        assert not g_out.is_contiguous()
        w = meanfield_draw(mean, rho, None, 2, _gen(4))[0]
        gm, gr = torch.autograd.grad((w * g_out).sum(), (mean, rho))
        eps = standard_normal((2, *shape), torch.float32, torch.device("cpu"), _gen(4))
        torch.testing.assert_close(gm, g_out.sum(0))
        torch.testing.assert_close(gr, (g_out * eps).sum(0) * torch.sigmoid(rho.detach()))


def test_recovered_eps_is_accurate_in_float32():
    # The recover path's error bound: ~6e-8 * |w| / std relative, here std = 1e-3 |mean|.
    torch.manual_seed(2)
    with torch_threads(2):
        mean = (torch.randn(300, 900) * 3).requires_grad_()
        std = (mean.detach().abs() * 1e-3).clamp_min(1e-3).double()
        rho = (std + torch.log(-torch.expm1(-std))).float().requires_grad_()  # softplus(rho) = std
        g_out = torch.randn(3, 300, 900)
        w = meanfield_draw(mean, rho, None, 3, _gen(9))[0]
        _, gr = torch.autograd.grad((w * g_out).sum(), (mean, rho))
        eps = standard_normal((3, 300, 900), torch.float32, torch.device("cpu"), _gen(9))
        sig = torch.sigmoid(rho.detach().double())
        ref = (g_out.double() * eps.double()).sum(0) * sig
        assert ((gr.double() - ref).abs() <= 1e-3 * sig * (g_out.abs().sum(0).double() + 1e-6)).all()


def test_pool_workers_run_single_threaded_ops_without_changing_the_callers_count():
    import threading

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = torch.randn(100_000)
        counts = _normal.run_parallel([lambda: float((x * 2).sum()) and torch.get_num_threads() for _ in range(4)])
        assert counts == [1, 1, 1, 1]  # no OpenMP team per worker: 2 workers on 2 cores, not 4 threads
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]  # the process-wide default new threads start from is the caller's again
    finally:
        torch.set_num_threads(prev)


# -- eval draws keep their memory for the next eval draw (_normal.SAMPLE_POOL_BYTES) -----------------
def _eval_draw(mean: torch.Tensor, rho: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return meanfield_draw(mean, rho, None, 4, None, seed=seed)[0]


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(_normal._LOCAL, "pool", None, raising=False)
    return monkeypatch


def test_eval_draws_reuse_memory_nothing_holds_and_keep_values(pool):
    mean, rho = torch.randn(7, 5), torch.randn(7, 5) - 2
    first = _eval_draw(mean, rho, 1)
    kept = first.clone()
    held = _eval_draw(mean, rho, 2)  # `first` is alive: other memory, `first` untouched
    assert held.data_ptr() != first.data_ptr() and torch.equal(first, kept)
    ptr = first.data_ptr()
    view = first[1:]
    del first
    assert _eval_draw(mean, rho, 3).data_ptr() != ptr  # a view of it is alive
    del view
    again = _eval_draw(mean, rho, 1)
    assert again.data_ptr() == ptr and torch.equal(again, kept)  # reused, the same values as fresh memory
    # a training draw takes it too, as a tensor of its own (the pool's never gets a grad_fn)
    del again
    w = meanfield_draw(mean.requires_grad_(), rho, 0.0, 4, None, seed=1)[0]
    assert w.data_ptr() == ptr and w.grad_fn is not None
    assert all(t.grad_fn is None for kept in _normal._LOCAL.pool["free"].values() for t in kept)
    # one that finds no memory of its shape lets the kept memory of other shapes go
    del w
    meanfield_draw(torch.randn(3, 2, requires_grad=True), torch.randn(3, 2), 0.0, 4, None, seed=1)
    left = _normal._LOCAL.pool["free"][((4, 7, 5), torch.float32)]
    assert len(left) == 1 and left[0] is held  # the one still held stays
    # another sample count (bf.predict's) goes back at any training draw, hit or miss
    _eval_draw(torch.randn(3, 2), torch.randn(3, 2), 0)  # (4, 3, 2), let go at once
    with torch.no_grad():
        meanfield_draw(torch.randn(3, 2), torch.randn(3, 2), None, 9, None, seed=1)  # (9, 3, 2)
    meanfield_draw(torch.randn(3, 2, requires_grad=True), torch.randn(3, 2), 0.0, 4, None, seed=1)
    assert not _normal._LOCAL.pool["free"][((9, 3, 2), torch.float32)]


def test_eval_draws_keep_at_most_the_pool_budget(pool):
    mean, rho = torch.randn(7, 5), torch.randn(7, 5) - 2
    pool.setattr(_normal, "SAMPLE_POOL_BYTES", 0)
    for seed in range(3):
        _eval_draw(mean, rho, seed)  # each let go at once: nothing may keep it
    assert _normal._LOCAL.pool["bytes"] == 0
    assert all(len(v) == 0 for v in _normal._LOCAL.pool["free"].values())


def test_model_eval_forward_reuses_sample_memory_with_the_same_outputs(pool):
    import bayesify as bf

    torch.manual_seed(0)
    bnn = bf.bayesify(torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))).eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        a = bnn(x, samples=5, generator=_gen(0))
        weights = bnn._draw(5, _gen(0), False)[0]
        ptrs = {k: w.data_ptr() for k, w in weights.items()}
        del weights
        b = bnn(x, samples=5, generator=_gen(0))
        again = bnn._draw(5, _gen(0), False)[0]
    assert torch.equal(a, b)
    assert {k: w.data_ptr() for k, w in again.items()} == ptrs  # the same memory each call
    pool.setattr(_normal, "SAMPLE_POOL_BYTES", 0)
    pool.setattr(_normal._LOCAL, "pool", None)
    with torch.no_grad():
        assert torch.equal(bnn(x, samples=5, generator=_gen(0)), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [16, 2 * _normal.FILL_PIECE - 1, 2 * _normal.FILL_PIECE, 3 * _normal.FILL_PIECE + 5,
                               BLOCK, BLOCK - 3, 1200 * 218])
def test_a_block_drawn_in_pieces_equals_one_normal_call(n, dtype):
    """The pieces continue one generator stream: bit for bit what one ``normal_`` over the block gives."""
    out = _normal._fill(torch.empty(n, dtype=dtype), 11)
    ref = torch.empty(n, dtype=dtype).normal_(generator=_gen(11 & _normal._MASK))
    assert torch.equal(out, ref)
