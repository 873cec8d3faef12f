"""The Nyström maths (nlora/nystrom.py) against float64 references: index selection, the SVD-free truncated
pseudo-inverse, the optimal core, the C U⁺ R reconstruction (paper Eq. 6). Hypothesis over shapes, ranks, index sets."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from nlora.nystrom import (_ct_w, check_rcond, default_rtol, left_multiply, mm_out_dtype_works, nystrom_reconstruct,
                           optimal_core, optimal_cores, regularised_pinv, select_indices, truncated_pinv)

EPS32 = torch.finfo(torch.float32).eps
F64 = torch.float64


def rel_err(got, want):
    """Largest entry error relative to the largest entry of ``want`` (0 for two zero tensors)."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300))


def orthonormal(g, *shape):
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=F64))[0]


# ---------------------------------------------------------------------------------------------------- index selection


@given(st.integers(2, 40), st.integers(2, 40), st.data(), st.sampled_from(["random", "norm"]))
def test_index_selection_is_distinct_sorted_and_seeded(out_f, in_f, data, method):
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    w = torch.randn(out_f, in_f)
    w[0] = 0  # a zero row must not break norm sampling
    seed = data.draw(st.integers(0, 1000))
    rows, cols = select_indices(w, rank, method, torch.Generator().manual_seed(seed))
    rows2, cols2 = select_indices(w, rank, method, torch.Generator().manual_seed(seed))
    assert torch.equal(rows, rows2) and torch.equal(cols, cols2)
    for idx, n in ((rows, out_f), (cols, in_f)):
        assert idx.numel() == rank and idx.unique().numel() == rank
        assert torch.equal(idx, idx.sort().values) and 0 <= int(idx.min()) and int(idx.max()) < n


def test_first_indices_are_the_papers_and_unknown_methods_are_refused():
    rows, cols = select_indices(torch.randn(9, 7), 4)
    assert torch.equal(rows, torch.arange(4)) and torch.equal(cols, torch.arange(4))
    with pytest.raises(ValueError, match="index='svd': choose one of"):
        select_indices(torch.randn(9, 7), 4, "svd")


def test_norm_sampling_prefers_heavy_rows():
    w = torch.full((200, 50), 1e-3)
    w[:10] = 10.0
    hits = sum(int((select_indices(w, 10, "norm", torch.Generator().manual_seed(s))[0] < 10).sum())
               for s in range(20))
    assert hits > 150  # 200 draws, almost all from the 10 heavy rows


# ------------------------------------------------------------------------------------------------- truncated_pinv


@st.composite
def gapped(draw, max_dim=10):
    """``(mat, rcond)``: a float64 batch whose singular values are all ``>= 2 rcond σ_max`` (kept) or ``<= rcond σ_max
    / 2`` (dropped, zero at times), with a random number kept per matrix (none: a zero matrix)."""
    m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    batch = draw(st.sampled_from([(), (3,), (2, 2)]))
    rcond = draw(st.sampled_from([1e-4, 1e-2, 0.1, 0.4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    k = min(m, n)
    kept = torch.randint(0, k + 1, (*batch, 1), generator=g)
    lo = max(2 * rcond, 1e-4)  # kept values in [lo, 1], so cond <= 1e4
    big = torch.exp(math.log(lo) * torch.rand(*batch, k, generator=g, dtype=F64)).sort(-1, descending=True).values
    big[..., 0] = 1.0
    small = rcond / 2 * torch.rand(*batch, k, generator=g, dtype=F64) * (torch.rand(*batch, k, generator=g) < 0.7)
    s = torch.where(torch.arange(k) < kept, big, small) * (kept > 0)
    mat = orthonormal(g, *batch, m, k) * s[..., None, :] @ orthonormal(g, *batch, n, k).mT
    return mat * draw(st.sampled_from([1e-3, 1.0, 50.0])), rcond


@given(gapped())
def test_truncated_pinv_matches_torch_pinv_across_a_spectral_gap(case):
    mat, rcond = case
    got = truncated_pinv(mat, rcond)
    assert got.dtype == F64 and got.shape == (*mat.shape[:-2], mat.shape[-1], mat.shape[-2])
    want = torch.linalg.pinv(mat, rtol=rcond)
    torch.testing.assert_close(regularised_pinv(mat, rcond), want, rtol=0, atol=0)
    assert rel_err(got, want) < 1e-7  # fp64 Gram: error ~ eps64 cond² <= 2e-8 (cond <= 1e4)


@given(st.integers(1, 12), st.integers(1, 12), st.data(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_truncated_pinv_default_cutoff_is_torchs(m, n, data, dtype):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    rank = data.draw(st.integers(0, min(m, n)))
    mat = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)).to(dtype)
    rtol = default_rtol(m, n)  # torch's default for the fp32 result
    assert rtol == EPS32 * max(m, n)
    sv = torch.linalg.svdvals(mat.double())
    cut = rtol * sv[0]
    assume(sv[0] == 0 or not ((sv > cut / 3) & (sv < 3 * cut)).any())  # both sides agree on what is cut
    assume(sv[0] == 0 or (sv[sv > cut] / sv[0]).min() > 1e-4)
    got = truncated_pinv(mat)
    assert got.dtype == torch.float32
    assert rel_err(got, torch.linalg.pinv(mat.double(), rtol=rtol)) < 1e-5


@given(st.integers(1, 10), st.integers(1, 10), st.data())
def test_truncated_pinv_satisfies_the_penrose_conditions(m, n, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    rank = data.draw(st.integers(1, min(m, n)))
    a = torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64)
    sv = torch.linalg.svdvals(a)
    cond = float(sv[0] / sv[rank - 1])
    assume(cond < 1e4)
    p = truncated_pinv(a, data.draw(st.sampled_from([None, 0.0, 1e-6])))  # fp64: cutoffs floored above the noise
    tol = 1e-14 * cond**2 + 1e-13
    assert rel_err(a @ p @ a, a) < tol
    assert rel_err(p @ a @ p, p) < tol
    for sym in (a @ p, p @ a):  # orthogonal projections onto the column and row spaces
        assert rel_err(sym, sym.mT) < tol


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 5), (4, 6, 2), (2, 3, 4, 4), (3, 0), (0, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
def test_truncated_pinv_of_zero_is_zero(shape, dtype):
    z = torch.zeros(shape, dtype=dtype)
    for rcond in (None, 0.0, 0.1):
        p = truncated_pinv(z, rcond)
        assert p.dtype == torch.promote_types(dtype, torch.float32)
        assert torch.equal(p, torch.zeros(*shape[:-2], shape[-1], shape[-2], dtype=p.dtype))


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
def test_truncated_pinv_of_a_batch_of_mixed_ranks(shape):
    g = torch.Generator().manual_seed(0)
    m, n = shape
    k = min(m, n)
    mats = torch.stack([torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
                        for r in [*range(k + 1), k, 1]])
    mats[-1, :, 0] = 0  # a zero column on top
    got = truncated_pinv(mats)
    for mat, p in zip(mats, got):
        assert rel_err(p, truncated_pinv(mat)) < 1e-9  # batched and single eigh round differently
        assert rel_err(p, torch.linalg.pinv(mat, rtol=1e-10)) < 1e-9
    assert torch.equal(got[0], torch.zeros(n, m, dtype=F64)) and got[-1][0].abs().max() == 0


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1", torch.tensor(0.1)])
def test_check_rcond_refuses_bad_values(bad):
    msg = r"must be a finite number >= 0 \(relative to σ_max\), or None for torch's default cutoff"
    with pytest.raises(ValueError, match=msg):
        check_rcond(bad)
    w = torch.randn(6, 5)
    for call in (lambda: truncated_pinv(w, bad), lambda: optimal_core(w, torch.arange(2), torch.arange(2), bad),
                 lambda: optimal_cores([w], [w[:, :2]], [w[:2]], bad)):
        with pytest.raises(ValueError, match=msg):
            call()
    for good in (None, 0, 0.0, 0.1, 3):
        check_rcond(good)


# ------------------------------------------------------------------------------- fidelity and the Nyström structure


@st.composite
def exact_rank_r(draw):
    """``(W, rows, cols)`` in float64: ``W = C U⁻¹ R`` of exact rank r with ``W[rows, cols] = U``, cond(U) <= 8."""
    r = draw(st.integers(1, 8))
    out_f, in_f = draw(st.integers(r, 48)), draw(st.integers(r, 48))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = 10.0 ** draw(st.integers(-2, 2))
    s = scale * torch.exp(math.log(8) * torch.rand(r, generator=g, dtype=F64))
    u = orthonormal(g, r, r) * s @ orthonormal(g, r, r).mT
    rows = torch.randperm(out_f, generator=g)[:r].sort().values
    cols = torch.randperm(in_f, generator=g)[:r].sort().values
    c = scale * torch.randn(out_f, r, generator=g, dtype=F64)
    rr = scale * torch.randn(r, in_f, generator=g, dtype=F64)
    c[rows], rr[:, cols] = u, u
    return c @ torch.linalg.inv(u) @ rr, rows, cols


@given(exact_rank_r())
def test_pinv_and_optimal_cores_reproduce_an_exact_rank_r_weight_to_fp32_rounding(case):
    w64, rows, cols = case
    w = w64.float()  # everything below in fp32
    c, u, r = w[:, cols], w[rows][:, cols], w[rows]
    assert torch.equal(u.double(), w64[rows][:, cols].float().double())
    for core in (truncated_pinv(u, rcond=0.1), optimal_core(w, rows, cols)):
        assert core.dtype == torch.float32
        recon = c @ core @ r
        assert float(torch.linalg.matrix_norm(recon.double() - w64) / torch.linalg.matrix_norm(w64)) < 1e-5


def gaussian_case(out_f: int, in_f: int, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 Gaussian ``(out_f, in_f)`` weight and random row / column index sets of a drawn rank."""
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(out_f, in_f, generator=g, dtype=F64)
    return w, torch.randperm(out_f, generator=g)[:rank], torch.randperm(in_f, generator=g)[:rank]


@given(st.integers(1, 14), st.integers(1, 14), st.data())
def test_eq6_sampled_rows_and_columns_are_reproduced(out_f, in_f, data):
    """Paper Eq. 6: with an invertible U, rows I of C U⁺ R are R and columns J are C (U U⁺ = U⁺ U = I)."""
    w, rows, cols = gaussian_case(out_f, in_f, data)
    c, u, r = w[:, cols], w[rows][:, cols], w[rows]
    cond = float(torch.linalg.cond(u))
    assume(cond < 1e3)
    recon = c @ truncated_pinv(u, rcond=1e-5) @ r
    tol = 1e-13 * cond**2 + 1e-13
    assert rel_err(recon[rows], r) < tol and rel_err(recon[:, cols], c) < tol


def eq6_block_form(w, rows, cols):
    """Eq. 6 built block by block in float64, in the permuted order (sampled rows/cols first)."""
    rest_r = torch.tensor([i for i in range(w.shape[0]) if i not in set(rows.tolist())], dtype=torch.long)
    rest_c = torch.tensor([j for j in range(w.shape[1]) if j not in set(cols.tolist())], dtype=torch.long)
    u = w[rows][:, cols]
    r_rest = w[rows][:, rest_c]
    c_rest = w[rest_r][:, cols]
    u_pinv = torch.linalg.pinv(u)
    top = torch.cat([u, r_rest], dim=1)
    bottom = torch.cat([c_rest, c_rest @ u_pinv @ r_rest], dim=1)
    return torch.cat([top, bottom], dim=0), torch.cat([rows, rest_r]), torch.cat([cols, rest_c])


@given(st.integers(1, 14), st.integers(1, 14), st.data())
def test_three_matrix_reconstruction_equals_eq6_block_form(out_f, in_f, data):
    w, rows, cols = gaussian_case(out_f, in_f, data)
    u = w[rows][:, cols]
    assume(torch.linalg.cond(u) < 1e6)  # Eq. 6's exact top blocks need an invertible core
    blocks, perm_r, perm_c = eq6_block_form(w, rows, cols)
    recon = nystrom_reconstruct(w, rows, cols)[perm_r][:, perm_c]
    scale = max(1.0, float(torch.linalg.cond(u)))
    torch.testing.assert_close(recon, blocks, rtol=1e-9 * scale, atol=1e-9 * scale)


@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_reconstruction_exact_when_weight_rank_at_most_r(out_f, in_f, data):
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    true_rank = data.draw(st.integers(1, rank))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(out_f, true_rank, generator=g, dtype=F64) @ torch.randn(true_rank, in_f, generator=g, dtype=F64)
    rows = torch.randperm(out_f, generator=g)[:rank]
    cols = torch.randperm(in_f, generator=g)[:rank]
    u = w[rows][:, cols]
    assume(torch.linalg.matrix_rank(u) == true_rank)  # the core must see the whole row/column space
    s = torch.linalg.svdvals(u)
    assume(s[true_rank - 1] / s[0] > 1e-6)
    # the cutoff must not drop the core's true singular values, only the numerical zeros
    recon = nystrom_reconstruct(w, rows, cols, rcond=1e-10)
    torch.testing.assert_close(recon, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))
    recon = w[:, cols] @ truncated_pinv(u, rcond=1e-6) @ w[rows]  # the SVD-free core: the same
    torch.testing.assert_close(recon, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))


# ---------------------------------------------------------------------------------------------------- optimal core


@given(st.integers(2, 30), st.integers(2, 30), st.data())
def test_optimal_core_matches_the_float64_truncated_formula(out_f, in_f, data):
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    rcond = data.draw(st.sampled_from([None, 1e-3]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(out_f, in_f, generator=g).to(data.draw(st.sampled_from([torch.float32, torch.bfloat16])))
    zero = data.draw(st.integers(0, 2))
    w[:zero], w[:, :zero] = 0, 0  # zero rows and columns: rank-deficient C and R when the indices hit them
    rows = torch.randperm(out_f, generator=g)[:rank]
    cols = torch.randperm(in_f, generator=g)[:rank]
    core = optimal_core(w, rows, cols, rcond)
    assert core.dtype == torch.float32 and core.shape == (rank, rank)
    w64 = w.double()
    c, r = w64[:, cols], w64[rows]
    rc, rr = (default_rtol(out_f, rank), default_rtol(rank, in_f)) if rcond is None else (rcond, rcond)
    conds = []
    for x, t in ((c, rc), (r, rr)):
        sv = torch.linalg.svdvals(x)
        assume(sv[0] == 0 or not ((sv > t * sv[0] / 3) & (sv < 3 * t * sv[0])).any())
        conds.append(float(sv[0] / sv[sv > t * sv[0]].min()) if sv[0] > 0 else 1.0)
    want = c @ torch.linalg.pinv(c, rtol=rc) @ w64 @ torch.linalg.pinv(r, rtol=rr) @ r
    # C N R is the projection of W onto C's columns and R's rows; fp32 Cᵀ W costs ~eps32 cond(C) cond(R) of |W|
    err = float((c @ core.double() @ r - want).abs().max())
    assert err <= 1e-5 * conds[0] * conds[1] * float(w64.abs().max())


@given(st.integers(1, 14), st.integers(1, 14), st.data())
def test_optimal_core_never_worse_than_pinv_core(out_f, in_f, data):
    w, rows, cols = gaussian_case(out_f, in_f, data)
    c, r = w[:, cols], w[rows, :]
    err_opt = torch.linalg.matrix_norm(w - c @ optimal_core(w, rows, cols).double() @ r)
    err_pinv = torch.linalg.matrix_norm(w - c @ torch.linalg.pinv(w[rows][:, cols]) @ r)
    conds = [float(torch.linalg.cond(x)) for x in (c, r)]
    slack = 1e-4 + 1e-6 * sum(conds) * float(torch.linalg.matrix_norm(w))  # optimal_core rounds W to fp32
    assert err_opt <= err_pinv * (1 + 1e-4) + slack


@pytest.mark.parametrize("rcond", [None, 0.1])
def test_optimal_cores_equal_optimal_core_layer_by_layer(rcond):
    """More than one stack (_STACK = 32) of one shape, several shapes and dtypes, zero slices, in shuffled order."""
    g = torch.Generator().manual_seed(0)
    specs = [(7, 5, torch.float32)] * 35 + [(9, 6, torch.bfloat16)] * 3 + [(5, 9, F64)] * 2 + [(4, 4, torch.float32)]
    order = torch.randperm(len(specs), generator=g).tolist()
    ws, rows, cols = [], [], []
    for i in order:
        out_f, in_f, dtype = specs[i]
        ws.append(torch.randn(out_f, in_f, generator=g).to(dtype))
        rows.append(torch.randperm(out_f, generator=g)[:3])
        cols.append(torch.randperm(in_f, generator=g)[:3])
    ws[-1] = torch.zeros_like(ws[-1])
    originals = [w.clone() for w in ws]
    cs = [w[:, j].float() for w, j in zip(ws, cols)]
    rs = [w[i].float() for w, i in zip(ws, rows)]
    cores = optimal_cores(ws, cs, rs, rcond, scaling=2.0)
    assert len(cores) == len(ws) and torch.equal(cores[-1], torch.zeros(3, 3))
    for w, i, j, core in zip(ws, rows, cols, cores):
        one = optimal_core(w, i, j, rcond) / 2.0
        assert core.dtype == torch.float32 and rel_err(core, one) < 1e-6
    assert all(torch.equal(w, o) for w, o in zip(ws, originals))  # pure: nothing modified
    assert optimal_cores([], [], []) == []


# ------------------------------------------------------------------------------------------ blockwise products


def test_left_multiply_upcasts_in_blocks():
    m = torch.randn(3, 50, dtype=torch.float32)
    w = torch.randn(50, 37).to(torch.bfloat16)
    torch.testing.assert_close(left_multiply(m, w, chunk=8), m @ w.float())


def test_ct_w_falls_back_to_left_multiply_where_mm_has_no_out_dtype():
    """On a backend without ``aten::mm.dtype`` (the CPU) a bf16 weight goes through the blockwise upcast."""
    w = torch.randn(40, 30).to(torch.bfloat16)
    c = w[:, :5].float()
    if not mm_out_dtype_works(w.device, w.dtype):
        assert torch.equal(_ct_w(c, w), left_multiply(c.mT, w))
    assert torch.allclose(_ct_w(c, w).double(), c.double().mT @ w.double(), rtol=1e-5, atol=1e-5)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cores_on_cuda_match_the_cpu(dtype):
    w = torch.randn(300, 200, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
    rows, cols = torch.arange(16, device="cuda"), torch.arange(16, device="cuda")
    core, cpu = optimal_core(w, rows, cols), optimal_core(w.cpu(), rows.cpu(), cols.cpu())
    torch.testing.assert_close(core.cpu(), cpu, rtol=1e-4, atol=1e-4 * float(cpu.abs().max()))
    p, p_cpu = truncated_pinv(w[:16, :16], 0.1), truncated_pinv(w[:16, :16].cpu(), 0.1)
    torch.testing.assert_close(p.cpu(), p_cpu, rtol=1e-4, atol=1e-4 * float(p_cpu.abs().max()))


@CUDA
def test_cores_make_no_host_sync_on_cuda():
    w = torch.randn(300, 200, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    rows, cols = torch.arange(16, device="cuda"), torch.arange(16, device="cuda")
    optimal_core(w, rows, cols), truncated_pinv(w[:16, :16])  # warm-up (handles, workspaces)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        truncated_pinv(w[:16, :16], 0.1)
        optimal_core(w, rows, cols)
    finally:
        torch.cuda.set_sync_debug_mode(0)
