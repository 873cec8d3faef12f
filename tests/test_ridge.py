"""The SVD-free Nyström cores (``solver="ridge"``, the default): ridge pseudo-inverse and optimal core by fp64 Gram +
Cholesky, against float64 SVD references of the same formula; rank-deficient and zero inputs; the deferred failure
check; no host synchronisation on a GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nlora
from nlora.inits import INITIALIZERS
from nlora.nystrom import INDEX_METHODS, _lambda_max_bound, optimal_core, regularised_pinv, ridge_pinv

from .conftest import assert_same_state, state_hash
from .model_zoo import one_thread  # noqa: F401 (autouse fixture)

EPS32 = torch.finfo(torch.float32).eps
LOW = [torch.float32, torch.bfloat16, torch.float16]


def ridge_pinv_reference(m, rtol):
    """The ridge pseudo-inverse by a float64 SVD: singular values σ/(σ² + λ), λ = max(rtol² b, 32 n eps64) tr(G),
    b = (Σ μ⁶⁴)^(1/64) (μ = σ²/Σσ², at least 1/n) the GEMM bound on the largest normalised Gram eigenvalue."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    n = s.numel()
    tr = s.square().sum()
    if tr == 0:
        return torch.zeros_like(m.double().mT)
    mu = s.square() / tr
    bound = max(float(mu.pow(64).sum() ** (1 / 64)), 1 / n)
    lam = max(rtol**2 * bound, 32 * n * torch.finfo(torch.float64).eps) * tr
    return vh.mT @ torch.diag(s / (s.square() + lam)) @ u.mT


def _tol(m: torch.Tensor, rtol: float, ref: torch.Tensor) -> float:
    """Absolute tolerance: fp64 solves lose ~eps64 · cond(G + λI); the result is rounded to fp32 at the end."""
    s = torch.linalg.svdvals(m.double())
    if s.numel() == 0 or s[0] == 0:
        return 1e-30
    lam = max(rtol**2, 32 * s.numel() * 2.2e-16) * s[0] ** 2 / 1.1  # below the λ used: an upper bound on cond
    cond = float((s[0] ** 2 + lam) / lam)
    return (1e-6 + 1e-14 * cond) * float(ref.abs().max()) + 1e-30


@st.composite
def matrices(draw, max_dim=24):
    """Random matrices of any aspect ratio and rank (rank-deficient ones included), with zero rows/columns at times."""
    m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    k = draw(st.integers(0, min(m, n)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        x[draw(st.integers(0, m - 1))] = 0
    return (x * scale).to(draw(st.sampled_from(LOW)))


@given(matrices(), st.sampled_from([None, 0.0, 1e-3, 0.1, 0.5]))
def test_ridge_pinv_matches_the_float64_filter(mat, rcond):
    got = ridge_pinv(mat, rcond)
    assert got.dtype == torch.float32 and got.shape == mat.shape[::-1]
    assert torch.isfinite(got).all()
    rtol = EPS32 * max(mat.shape) if rcond is None else rcond
    ref = ridge_pinv_reference(mat.double(), rtol)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=_tol(mat, rtol, ref))


@given(st.integers(1, 40), st.integers(0, 2**31 - 1), st.sampled_from([1e-200, 1.0, 1e200]))
def test_lambda_max_bound_brackets_the_largest_eigenvalue(n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    gram = x @ x.mT
    gram = gram / gram.trace()
    top = torch.linalg.eigvalsh(gram)[-1]
    bound = _lambda_max_bound(gram)
    assert top * (1 - 1e-12) <= bound <= top * n ** (1 / 64) * (1 + 1e-12)
    batch = torch.stack([gram, torch.eye(n, dtype=torch.float64) / n])  # batched, and the flat-spectrum worst case
    b = _lambda_max_bound(batch)
    torch.testing.assert_close(b[0], bound, rtol=1e-12, atol=0)
    assert 1 / n <= b[1] <= n ** (1 / 64) / n * (1 + 1e-12)


def test_ridge_pinv_of_zero_and_rank_deficient_matrices_is_finite():
    assert torch.equal(ridge_pinv(torch.zeros(5, 3)), torch.zeros(3, 5))
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    x[:, 1] = x[:, 0]  # duplicated column: an exactly singular Gram
    x[:, 3] = 0
    for rcond in (None, 0.0, 0.1):
        p = ridge_pinv(x, rcond)
        assert torch.isfinite(p).all()
        assert p[3].abs().max() == 0  # the zero column's row of the pseudo-inverse is exactly zero
        # duplicated columns share the inverse equally (to eps64 / λ: λ is ~1e-12 relative for None and 0)
        torch.testing.assert_close(p[0], p[1], rtol=1e-5 if rcond else 1e-3, atol=1e-5 if rcond else 1e-3)


def test_svd_solver_is_the_exact_truncation():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 20, generator=g)
    f = INITIALIZERS["nystrom-pinv"].fn(w, 6, scaling=2.0, index="random", generator=g, solver="svd")
    assert torch.equal(f.N, regularised_pinv(w[f.rows][:, f.cols], 0.1) / 2.0)
    rows, cols = f.rows, f.cols
    c, r = w[:, cols], w[rows]
    ref = regularised_pinv(c) @ w @ regularised_pinv(r)
    torch.testing.assert_close(optimal_core(w, rows, cols, solver="svd"), ref, rtol=0, atol=0)


@given(st.integers(2, 30), st.integers(2, 30), st.data())
def test_optimal_core_matches_the_float64_ridge_formula(out_f, in_f, data):
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    true_rank = data.draw(st.integers(0, min(out_f, in_f)))  # below rank: rank-deficient C and R
    dtype = data.draw(st.sampled_from(LOW))
    index = data.draw(st.sampled_from(INDEX_METHODS))
    rcond = data.draw(st.sampled_from([None, 1e-3, 0.1]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, true_rank, generator=g) @ torch.randn(true_rank, in_f, generator=g)).to(dtype)
    f = INITIALIZERS["nystrom-optimal"].fn(w, rank, scaling=1.0, index=index, rcond=rcond,
                                           generator=torch.Generator().manual_seed(seed))
    assert f.N.dtype == torch.float32 and torch.isfinite(f.N).all()
    w64 = w.double()
    c, r = w64[:, f.cols], w64[f.rows]
    rc, rr = (EPS32 * out_f, EPS32 * in_f) if rcond is None else (rcond, rcond)
    ref = ridge_pinv_reference(c, rc) @ w64 @ ridge_pinv_reference(r, rr)
    # The core itself is as ill-conditioned as C and R; what must match is the approximation C N R, up to the fp32
    # rounding of Cᵀ W (~eps32 / rtol relative) and of N itself (a tiny ridge leaves N a dynamic range ~1/rtol²).
    got, want = c @ f.N.double() @ r, c @ ref @ r
    scale = float(w64.abs().max()) + 1e-30
    cond = max(1.0, min(1.0 / (rc + 1e-300), 1e7), min(1.0 / (rr + 1e-300), 1e7))
    norm2 = lambda x: float(torch.linalg.matrix_norm(x, ord=2))  # noqa: E731
    # N's fp32 rounding scales with N itself, which can be far larger than ref: the fp32 Cᵀ W has rounding outside
    # the range of Cᵀ that the tiny ridge amplifies by ~1/λ (C N R then cancels it, but not N's rounding)
    stored = 4 * EPS32 * norm2(c) * max(norm2(ref), norm2(f.N.double())) * norm2(r) * min(c.shape[1], 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale * cond + stored)


@pytest.mark.parametrize("name", ["nystrom-pinv", "nystrom-optimal"])
@pytest.mark.parametrize("dtype", LOW)
def test_zero_rows_columns_and_zero_weights_give_finite_factors(name, dtype):
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(3)).to(dtype)
    w[:4] = 0
    w[:, :4] = 0  # the first-r core, C and R are all zero or rank-deficient
    for weight in (w, torch.zeros(12, 9, dtype=dtype)):
        for index in INDEX_METHODS:
            f = INITIALIZERS[name].fn(weight, 4, scaling=1.0, index=index, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(f.N).all(), (index, weight.abs().max())
    f = INITIALIZERS[name].fn(torch.zeros(12, 9, dtype=dtype), 4, scaling=1.0)
    assert torch.equal(f.N, torch.zeros(4, 4))


@pytest.mark.parametrize("name", ["nystrom-pinv", "nystrom-optimal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preserve_output_stays_exact(name, dtype, mlp):
    mlp = mlp.to(dtype)
    x = torch.randn(6, 24, dtype=dtype, generator=torch.Generator().manual_seed(1))
    before = mlp(x).double()
    originals = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    nlora.inject(mlp, "all-linear", rank=4, init=name, index="norm", seed=0)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(mlp(x).double(), before, rtol=tol, atol=tol)
    nlora.unload(mlp)
    for n, p in mlp.named_parameters():
        torch.testing.assert_close(p, originals[n], rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("name", ["nystrom-pinv", "nystrom-optimal"])
def test_failed_cholesky_gives_nan_and_inject_refuses_it(name, mlp, monkeypatch):
    real = torch.linalg.cholesky_ex

    def failing(a, **kw):
        chol, info = real(a, **kw)
        return chol, torch.ones_like(info)  # as if the factorisation had hit a non-positive pivot

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    w = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(INITIALIZERS[name].fn(w, 3, scaling=1.0).N).all()  # never finite garbage
    before = state_hash(mlp)
    with pytest.raises(ValueError, match="not finite"):
        nlora.inject(mlp, "all-linear", rank=3, init=name)
    assert_same_state(before, mlp)


@pytest.mark.parametrize("name", ["nystrom-pinv", "nystrom-optimal"])
@pytest.mark.parametrize("bad, match", [({"solver": "qr"}, "solver='qr'"), ({"rcond": -0.1}, "rcond=-0.1"),
                                        ({"rcond": float("nan")}, "rcond=nan")])
def test_bad_solver_options_are_refused(name, bad, match, mlp):
    before = state_hash(mlp)
    with pytest.raises(ValueError, match=match):
        nlora.inject(mlp, "all-linear", rank=3, init=name, **bad)
    assert_same_state(before, mlp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ridge_cores_make_no_host_sync_on_cuda(dtype):
    g = torch.Generator("cuda").manual_seed(0)
    w = torch.randn(300, 200, device="cuda", generator=g).to(dtype)
    rows, cols = torch.arange(16, device="cuda"), torch.arange(16, device="cuda")
    INITIALIZERS["nystrom-optimal"].fn(w, 16, scaling=1.0)  # warm-up (handles, workspaces)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = ridge_pinv(w[:16, :16])
        core = optimal_core(w, rows, cols)
        f = INITIALIZERS["nystrom-pinv"].fn(w, 16, scaling=1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = optimal_core(w.cpu(), rows.cpu(), cols.cpu())
    torch.testing.assert_close(core.cpu(), cpu, rtol=1e-4, atol=1e-4 * float(cpu.abs().max()))
    torch.testing.assert_close(p.cpu(), ridge_pinv(w[:16, :16].cpu()), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(f.N).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_batched_weight_samples_equal_one_by_one(device):
    from nlora.fingerprint import weight_sample, weight_samples

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(37, 19, generator=g).to(device, dt) for dt in (torch.float32, torch.bfloat16, torch.float32)]
    ws.append(torch.randn(23, 41, generator=g).to(device).T)  # a Conv1D-style transposed view
    ws.append(torch.empty(5, 5, device="meta"))
    got = weight_samples(ws)
    assert got[-1] is None
    for w, s in zip(ws[:-1], got[:-1]):
        assert s.device.type == "cpu" and torch.equal(s, weight_sample(w.cpu()))


def test_ct_w_falls_back_to_left_multiply_where_mm_has_no_out_dtype():
    """On a backend without ``aten::mm.dtype`` (the CPU) a bf16 weight goes through the blockwise upcast."""
    from nlora.nystrom import _ct_w, left_multiply, mm_out_dtype_works

    w = torch.randn(40, 30).to(torch.bfloat16)
    c = w[:, :5].float()
    if not mm_out_dtype_works(w.device, w.dtype):
        assert torch.equal(_ct_w(c, w), left_multiply(c.mT, w))
    assert torch.allclose(_ct_w(c, w).double(), c.double().mT @ w.double(), rtol=1e-5, atol=1e-5)
