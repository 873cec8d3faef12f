"""The Nyström maths and the initialisers, against float64 references (hypothesis over shapes, ranks, index sets)."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from nlora import get_init, nystrom_reconstruct, optimal_core, select_indices
from nlora.nystrom import left_multiply

from .test_ridge import ridge_pinv_reference


@st.composite
def weight_and_indices(draw, max_dim=14):
    out_f = draw(st.integers(1, max_dim))
    in_f = draw(st.integers(1, max_dim))
    rank = draw(st.integers(1, min(out_f, in_f)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    rows = torch.randperm(out_f, generator=g)[:rank]
    cols = torch.randperm(in_f, generator=g)[:rank]
    return w, rows, cols


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


@given(weight_and_indices())
def test_three_matrix_reconstruction_equals_eq6_block_form(case):
    w, rows, cols = case
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
    w = torch.randn(out_f, true_rank, generator=g, dtype=torch.float64) @ torch.randn(true_rank, in_f, generator=g,
                                                                                      dtype=torch.float64)
    rows = torch.randperm(out_f, generator=g)[:rank]
    cols = torch.randperm(in_f, generator=g)[:rank]
    u = w[rows][:, cols]
    assume(torch.linalg.matrix_rank(u) == true_rank)  # the core must see the whole row/column space
    s = torch.linalg.svdvals(u)
    assume(s[true_rank - 1] / s[0] > 1e-6)
    # the default pinv cut-off must not drop the core's true singular values, only the numerical zeros
    recon = nystrom_reconstruct(w, rows, cols, rcond=1e-10)
    torch.testing.assert_close(recon, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))


@given(weight_and_indices(), st.floats(0.25, 4.0), st.sampled_from(["first", "random", "norm"]),
       st.sampled_from(["nystrom-pinv", "nystrom-optimal"]), st.sampled_from(["ridge", "svd"]))
def test_pinv_and_optimal_inits_are_scaled_nystrom(case, scaling, index, name, solver):
    w = case[0]
    rank = case[1].numel()
    f = get_init(name).fn(w.float(), rank, scaling=scaling, index=index, generator=torch.Generator().manual_seed(7),
                          solver=solver)
    c, r = w[:, f.cols], w[f.rows, :]
    eps = torch.finfo(torch.float32).eps
    if name == "nystrom-pinv" and solver == "svd":
        sv = torch.linalg.svdvals(w[f.rows][:, f.cols])
        assume(((sv / sv[0] - 0.1).abs() > 1e-3).all())  # fp32 and fp64 agree on which values are cut
        core = torch.linalg.pinv(w[f.rows][:, f.cols], rtol=0.1)
    elif name == "nystrom-pinv":
        core = ridge_pinv_reference(w[f.rows][:, f.cols], 0.1)
    elif solver == "svd":
        core = torch.linalg.pinv(c) @ w @ torch.linalg.pinv(r)
    else:
        core = ridge_pinv_reference(c, eps * max(c.shape)) @ w @ ridge_pinv_reference(r, eps * max(r.shape))
    ref = c @ core @ r
    got = scaling * f.B.double() @ f.N.double() @ f.A.double()
    torch.testing.assert_close(f.B.double(), c, rtol=0, atol=1e-6)
    torch.testing.assert_close(f.A.double(), r, rtol=0, atol=1e-6)
    tol = 1e-4 * max(1.0, float(ref.abs().max())) * max(1.0, float(core.abs().max()))
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=tol)


@given(weight_and_indices(), st.sampled_from(["ridge", "svd"]))
def test_optimal_core_never_worse_than_pinv_core(case, solver):
    w, rows, cols = case
    c, r = w[:, cols], w[rows, :]
    err_opt = torch.linalg.matrix_norm(w - c @ optimal_core(w, rows, cols, solver=solver).double() @ r)
    err_pinv = torch.linalg.matrix_norm(w - c @ torch.linalg.pinv(w[rows][:, cols]) @ r)
    conds = [float(torch.linalg.cond(x)) for x in (c, r)]
    slack = 1e-4 + 1e-6 * sum(conds) * float(torch.linalg.matrix_norm(w))  # optimal_core rounds W to fp32
    if solver == "ridge":  # the ridge damps each kept direction by λ/(σ² + λ) <= (1.08 rtol cond)², rtol = eps32 max
        rtols = [torch.finfo(torch.float32).eps * max(x.shape) for x in (c, r)]
        slack += float(torch.linalg.matrix_norm(w)) * sum((1.1 * t * k) ** 2 for t, k in zip(rtols, conds))
    assert err_opt <= err_pinv * (1 + 1e-4) + slack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_faithful_nystrom_equals_reference_slices_bit_for_bit(dtype):
    torch.manual_seed(1)
    w = torch.randn(48, 32).to(dtype)
    r = 8
    f = get_init("nystrom").fn(w, r, scaling=1.0)
    # the paper's code: A = W[:r, :], N = W[:r, :r], B = W[:, :r], values copied into fp32 adapters
    assert torch.equal(f.A, w[:r, :].float()) and f.A.dtype == torch.float32
    assert torch.equal(f.N, w[:r, :r].float())
    assert torch.equal(f.B, w[:, :r].float())
    # fresh storage: training the factors can never write into the base weight
    assert f.A.data_ptr() != w.data_ptr() and f.B.data_ptr() != w.data_ptr()


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


def test_norm_sampling_prefers_heavy_rows():
    w = torch.full((200, 50), 1e-3)
    w[:10] = 10.0
    hits = sum(int((select_indices(w, 10, "norm", torch.Generator().manual_seed(s))[0] < 10).sum())
               for s in range(20))
    assert hits > 150  # 200 draws, almost all from the 10 heavy rows


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_pissa_factors_are_the_top_singular_triplets(svd):
    torch.manual_seed(2)
    w = torch.randn(30, 3) @ torch.randn(3, 20) + 1e-3 * torch.randn(30, 20)
    rank, scaling = 3, 2.0
    f = get_init("pissa").fn(w, rank, scaling=scaling, svd=svd, niter=6, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    got = scaling * f.B.double() @ f.N.double() @ f.A.double()
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.B.T.double() @ f.B.double(), torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)


def test_pissa_lowrank_is_seeded():
    w = torch.randn(40, 30)
    a = get_init("pissa").fn(w, 4, scaling=1.0, svd="lowrank", generator=torch.Generator().manual_seed(3))
    b = get_init("pissa").fn(w, 4, scaling=1.0, svd="lowrank", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.A, b.A) and torch.equal(a.N, b.N)


@given(rank=st.integers(1, 16), fan_in=st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_lora_a_is_bit_identical_to_torch_kaiming_uniform(rank, fan_in, seed):
    """nlora draws A with its own bound arithmetic (no per-call checks); the draws must equal nn.Linear's/PEFT's."""
    got = get_init("lora").fn(torch.zeros(3, fan_in), rank, scaling=1.0, generator=torch.Generator().manual_seed(seed))
    want = torch.nn.init.kaiming_uniform_(torch.empty(rank, fan_in), a=math.sqrt(5),
                                          generator=torch.Generator().manual_seed(seed))
    assert torch.equal(got.A, want)


def test_random_inits_follow_their_distributions():
    torch.manual_seed(0)
    w = torch.zeros(64, 256)
    lora = get_init("lora").fn(w, 16, scaling=1.0)
    assert lora.N is None and torch.count_nonzero(lora.B) == 0 and lora.A.shape == (16, 256)
    assert float(lora.A.abs().max()) <= 1 / math.sqrt(256)  # kaiming_uniform(a=√5) bound = 1/√fan_in
    gauss = get_init("gaussian").fn(w, 16, scaling=1.0)
    assert abs(float(gauss.A.std()) - 1 / 16) < 0.005 and torch.count_nonzero(gauss.B) == 0
    slora = get_init("slora").fn(w, 16, scaling=1.0)
    assert slora.N.shape == (16, 16) and float(slora.N.abs().max()) <= 1 / math.sqrt(16)
    assert torch.count_nonzero(slora.B) == 0
    slora_g = get_init("slora").fn(w, 16, scaling=1.0, middle="gaussian")
    assert abs(float(slora_g.N.std()) - 1 / 16) < 0.01
    with pytest.raises(ValueError, match="middle"):
        get_init("slora").fn(w, 16, scaling=1.0, middle="uniform")


def test_left_multiply_upcasts_in_blocks():
    m = torch.randn(3, 50, dtype=torch.float32)
    w = torch.randn(50, 37).to(torch.bfloat16)
    torch.testing.assert_close(left_multiply(m, w, chunk=8), m @ w.float())


def test_nystrom_init_does_not_read_past_what_it_needs_on_bf16_weights():
    """Nyström inits on low-precision weights copy slices only; the optimal core works blockwise."""
    torch.manual_seed(4)
    w = torch.randn(64, 48).to(torch.bfloat16)
    f = get_init("nystrom-optimal").fn(w, 6, scaling=1.0, index="norm", generator=torch.Generator().manual_seed(0))
    ref = optimal_core(w.float(), f.rows, f.cols)
    torch.testing.assert_close(f.N, ref, rtol=1e-4, atol=1e-5)
