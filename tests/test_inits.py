"""The initialisers (nlora/inits.py): parity with the paper's reference code, the random inits' distributions, PiSSA,
the pinv / optimal Nyström inits against float64 formulas (every dtype, index method and rcond, rank-deficient and
zero weights), their batched ``many`` forms, what inject does with them (outputs preserved, bad options refused with
the model unchanged), and registering a user's init."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nlora
from nlora import NLoRALinear, get_init, truncated_pinv
from nlora.inits import INITIALIZERS, Factors, init_nystrom
from nlora.model import adapter_layers
from nlora.nystrom import INDEX_METHODS, default_rtol

from .conftest import assert_same_state, state_hash
from .model_zoo import one_thread  # noqa: F401 (autouse fixture)

BATCHED = ["nystrom-pinv", "nystrom-optimal"]
LOW = [torch.float32, torch.bfloat16, torch.float16]
F64 = torch.float64


def paper_reference(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's code: ``A = W[:r, :]``, ``N = W[:r, :r]``, ``B = W[:, :r]`` (the core itself, not its inverse)."""
    return w[:r, :], w[:r, :r], w[:, :r]


# -- the paper's reference code -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
def test_faithful_nystrom_equals_the_reference_slices_bit_for_bit(dtype):
    torch.manual_seed(1)
    w = torch.randn(48, 32).to(dtype)
    f = get_init("nystrom").fn(w, 8, scaling=1.0)
    for got, want in zip((f.A, f.N, f.B), paper_reference(w, 8)):
        assert got.dtype == torch.float32 and torch.equal(got, want.float())  # upcast exactly
    assert f.A.data_ptr() != w.data_ptr() and f.B.data_ptr() != w.data_ptr()  # training never writes into W
    assert torch.equal(f.rows, torch.arange(8)) and torch.equal(f.cols, torch.arange(8))


@pytest.mark.parametrize("train", ["all", "middle"])
def test_injected_nlora_and_inttune_hold_the_reference_slices(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16)).to(torch.bfloat16)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    nlora.inject(model, "all-linear", rank=4, init="nystrom", train=train)
    for name, layer in adapter_layers(model).items():
        w = pretrained[f"{name}.weight"]
        assert torch.equal(layer.weight, w)  # the paper's NLoRA leaves the base weight alone
        for got, want in zip((layer.lora_A, layer.lora_N, layer.lora_B), paper_reference(w, 4)):
            assert torch.equal(got.float(), want.float())


# -- random inits and PiSSA -------------------------------------------------------------------------------------
@given(rank=st.integers(1, 16), fan_in=st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_lora_a_is_bit_identical_to_torch_kaiming_uniform(rank, fan_in, seed):
    """nn.Linear's and PEFT's draw: ``nn.init.kaiming_uniform_(a=sqrt(5))`` with the same generator."""
    got = get_init("lora").fn(torch.zeros(3, fan_in), rank, scaling=1.0, generator=torch.Generator().manual_seed(seed))
    want = nn.init.kaiming_uniform_(torch.empty(rank, fan_in), a=math.sqrt(5),
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


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_pissa_factors_are_the_top_singular_triplets(svd):
    torch.manual_seed(2)
    w = torch.randn(30, 3) @ torch.randn(3, 20) + 1e-3 * torch.randn(30, 20)
    f = get_init("pissa").fn(w, 3, scaling=2.0, svd=svd, niter=6, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    torch.testing.assert_close(2.0 * f.B.double() @ f.N.double() @ f.A.double(), (u[:, :3] * s[:3]) @ vh[:3],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.B.T.double() @ f.B.double(), torch.eye(3, dtype=F64), atol=1e-5, rtol=0)


def test_pissa_lowrank_is_seeded():
    w = torch.randn(40, 30)
    a, b = (get_init("pissa").fn(w, 4, scaling=1.0, svd="lowrank", generator=torch.Generator().manual_seed(3))
            for _ in range(2))
    assert torch.equal(a.A, b.A) and torch.equal(a.N, b.N) and torch.equal(a.B, b.B)


# -- pinv / optimal: scaled Nyström against float64 -----------------------------------------------------------------
@st.composite
def weight_rank_index(draw, max_dim=14):
    out_f, in_f = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    rank = draw(st.integers(1, min(out_f, in_f)))
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))))
    return w, rank, draw(st.sampled_from(INDEX_METHODS)), draw(st.integers(0, 1000))


def _kept_cond(x: torch.Tensor, rtol: float) -> float:
    """cond of ``x`` over the singular values a cutoff ``rtol σ_max`` keeps (1 for a zero matrix)."""
    sv = torch.linalg.svdvals(x)
    return float(sv[0] / sv[sv > rtol * sv[0]].min()) if sv[0] > 0 else 1.0


@given(weight_rank_index(), st.floats(0.25, 4.0), st.sampled_from(BATCHED))
def test_pinv_and_optimal_inits_are_scaled_nystrom(case, scaling, name):
    """``B = W[:, cols]``, ``A = W[rows]`` exactly, and ``scaling · B N A = C core R``: pinv's core is ``U⁺`` cut at
    0.1 σ_max, optimal's ``C⁺ W R⁺`` at torch's default cutoffs (float64 references)."""
    w, rank, index, seed = case
    f = get_init(name).fn(w, rank, scaling=scaling, index=index, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(f.B, w[:, f.cols]) and torch.equal(f.A, w[f.rows]) and f.N.dtype == torch.float32
    w64 = w.double()
    c, u, r = w64[:, f.cols], w64[f.rows][:, f.cols], w64[f.rows]
    if name == "nystrom-pinv":
        sv = torch.linalg.svdvals(u)
        assume(((sv / sv[0] - 0.1).abs() > 1e-3).all())  # fp32 and fp64 agree on which values are cut
        core, cond = torch.linalg.pinv(u, rtol=0.1), 10.0
    else:
        rc, rr = default_rtol(*c.shape), default_rtol(*r.shape)
        core = torch.linalg.pinv(c, rtol=rc) @ w64 @ torch.linalg.pinv(r, rtol=rr)
        cond = _kept_cond(c, rc) * _kept_cond(r, rr)
    want = c @ core @ r
    got = scaling * f.B.double() @ f.N.double() @ f.A.double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * cond * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("rcond", [0.1, 1e-3, None])
def test_pinv_n_is_the_truncated_pseudo_inverse_of_u_over_scaling(rcond):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 20, generator=g)
    f = get_init("nystrom-pinv").fn(w, 6, scaling=2.0, index="random", generator=g, rcond=rcond)
    u = w[f.rows][:, f.cols]
    assert torch.equal(f.N, truncated_pinv(u, rcond) / 2.0)
    sv = torch.linalg.svdvals(u.double())
    rtol = default_rtol(6, 6) if rcond is None else rcond
    assert not ((sv > rtol * sv[0] / 2) & (sv < 2 * rtol * sv[0])).any()  # no value near the cut: the same as pinv
    torch.testing.assert_close(f.N.double(), torch.linalg.pinv(u.double(), rtol=rtol) / 2.0, rtol=1e-4, atol=1e-5)


@given(st.integers(2, 30), st.integers(2, 30), st.data())
def test_optimal_n_of_any_weight_is_finite_and_matches_the_float64_formula(out_f, in_f, data):
    """fp32/bf16/fp16 weights of any true rank (rank-deficient C and R included), every index method and rcond:
    ``C N R`` equals ``C C⁺ W R⁺ R`` in float64 up to fp32 rounding amplified by the kept conditioning of C and R."""
    rank = data.draw(st.integers(1, min(out_f, in_f)))
    true_rank = data.draw(st.integers(0, min(out_f, in_f)))
    dtype = data.draw(st.sampled_from(LOW))
    index = data.draw(st.sampled_from(INDEX_METHODS))
    rcond = data.draw(st.sampled_from([None, 1e-3, 0.1]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, true_rank, generator=g) @ torch.randn(true_rank, in_f, generator=g)).to(dtype)
    f = get_init("nystrom-optimal").fn(w, rank, scaling=1.0, index=index, rcond=rcond,
                                       generator=torch.Generator().manual_seed(seed))
    assert f.N.dtype == torch.float32 and f.N.shape == (rank, rank) and torch.isfinite(f.N).all()
    w64 = w.double()
    c, r = w64[:, f.cols], w64[f.rows]
    rc, rr = (default_rtol(out_f, rank), default_rtol(rank, in_f)) if rcond is None else (rcond, rcond)
    for m, cut in ((c, rc), (r, rr)):  # a singular value within the truncation's ±3% band of the cut may go either way
        sv = torch.linalg.svdvals(m)
        assume(not ((sv / sv[0] / cut - 1).abs() < 0.03).any())
    want = c @ torch.linalg.pinv(c, rtol=rc) @ w64 @ torch.linalg.pinv(r, rtol=rr) @ r
    err = float((c @ f.N.double() @ r - want).abs().max())
    assert err <= 1e-6 * _kept_cond(c, rc) * _kept_cond(r, rr) * (float(w64.abs().max()) + 1e-30)


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("dtype", LOW)
def test_zero_rows_columns_and_zero_weights_give_finite_factors(name, dtype):
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(3)).to(dtype)
    w[:4] = 0
    w[:, :4] = 0  # the first-r core, C and R are all zero or rank-deficient
    for weight in (w, torch.zeros(12, 9, dtype=dtype)):
        for index in INDEX_METHODS:
            f = INITIALIZERS[name].fn(weight, 4, scaling=1.0, index=index, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(f.N).all(), (index, weight.abs().max())
    assert torch.equal(INITIALIZERS[name].fn(torch.zeros(12, 9, dtype=dtype), 4, scaling=1.0).N, torch.zeros(4, 4))


# -- the batched ``many`` forms ------------------------------------------------------------------------------------
def _weights(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """Layers of mixed shapes and true ranks (full, rank-deficient, zero, zero rows/columns), ranks and scalings."""
    g = torch.Generator().manual_seed(seed)
    spec = [((40, 30), 30, 8, 2.0), ((30, 40), 3, 8, 2.0), ((40, 30), 0, 5, 1.0), ((25, 25), 25, 8, 0.5),
            ((40, 30), 6, 8, 2.0), ((17, 33), 17, 5, 1.0), ((30, 40), 30, 8, 2.0), ((12, 9), 9, 4, 2.0)]
    ws, ranks, scalings = [], [], []
    for (o, i), k, rank, s in spec:
        w = torch.randn(o, k, generator=g) @ torch.randn(k, i, generator=g) * 3
        if (o, i) == (12, 9):
            w[:4] = 0
            w[:, :4] = 0
        ws.append(w.to(dtype))
        ranks.append(rank)
        scalings.append(s)
    return ws, ranks, scalings


def _gens(n: int, seed: int = 5) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _assert_same_factors(got: Factors, want: Factors) -> None:
    for k in ("rows", "cols", "A", "B"):
        assert torch.equal(getattr(got, k), getattr(want, k)), k
    assert got.N.dtype == want.N.dtype == torch.float32 and torch.isfinite(got.N).all()
    # one batched eigh against one per layer: equal up to the last bits of fp32
    torch.testing.assert_close(got.N, want.N, rtol=1e-5, atol=1e-6 * float(want.N.abs().max()) + 1e-30)


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("index", INDEX_METHODS)
def test_many_equals_the_per_layer_init(name, dtype, index):
    spec = INITIALIZERS[name]
    ws, ranks, scalings = _weights(dtype)
    for rcond in (None, 0.0, 1e-3, 0.1):
        got = spec.many(ws, ranks, scalings=scalings, generators=_gens(len(ws)), index=index, rcond=rcond)
        assert len(got) == len(ws)
        for w, k, s, g, f in zip(ws, ranks, scalings, _gens(len(ws)), got):
            _assert_same_factors(f, spec.fn(w, k, scaling=s, generator=g, index=index, rcond=rcond))


@pytest.mark.parametrize("name", BATCHED)
def test_many_draws_from_the_global_rng_in_layer_order_without_generators(name):
    spec = INITIALIZERS[name]
    ws, ranks, scalings = _weights(torch.float32, seed=1)
    torch.manual_seed(11)
    got = spec.many(ws, ranks, scalings=scalings, generators=[None] * len(ws), index="random")
    torch.manual_seed(11)
    for w, k, s, f in zip(ws, ranks, scalings, got):
        _assert_same_factors(f, spec.fn(w, k, scaling=s, generator=None, index="random"))


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("bad, match", [({"rcond": -1.0}, "rcond=-1.0"), ({"index": "best"}, "index='best'")])
def test_many_refuses_bad_options(name, bad, match):
    ws, ranks, scalings = _weights(torch.float32)
    with pytest.raises(ValueError, match=match):
        INITIALIZERS[name].many(ws, ranks, scalings=scalings, generators=_gens(len(ws)), **bad)


class Mixed(nn.Module):
    """Layers of several shapes, named so that rank_pattern / alpha_pattern pick some of them."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        shapes = {"q": (32, 32), "k": (32, 32), "up": (32, 48), "down": (48, 32), "gate": (32, 48), "tiny": (12, 9)}
        self.blocks = nn.ModuleList(nn.ModuleDict({n: nn.Linear(i, o) for n, (i, o) in shapes.items()})
                                    for _ in range(3))
        with torch.no_grad():
            self.blocks[1]["k"].weight[:, 5:] = 0  # rank-deficient
            self.blocks[2]["gate"].weight.zero_()  # zero
        self.to(dtype)

    def forward(self, x):
        for b in self.blocks:
            h = b["q"](x) + b["k"](x)
            x = b["down"](torch.tanh(b["up"](h)) * b["gate"](h))
        return x


def _without_many(monkeypatch, name):
    monkeypatch.setitem(INITIALIZERS, name, dataclasses.replace(INITIALIZERS[name], many=None))


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("dtype, index, rcond", [(torch.float32, "first", None), (torch.bfloat16, "norm", 0.1),
                                                 (torch.float16, "random", 1e-3), (torch.float32, "norm", 0.0)])
def test_inject_gives_the_same_model_as_layer_by_layer_init(name, dtype, index, rcond, monkeypatch):
    model = Mixed(dtype)
    kw = dict(rank=6, init=name, seed=3, index=index, rcond=rcond, exclude=["tiny"],
              rank_pattern={"up|down": 8, r"blocks\.2\.q": 4}, alpha_pattern={"gate": 12.0})
    calls = []
    real = INITIALIZERS[name].many
    monkeypatch.setitem(INITIALIZERS, name, dataclasses.replace(
        INITIALIZERS[name], many=lambda *a, **k: calls.append(len(a[0])) or real(*a, **k)))
    batched = nlora.inject(copy.deepcopy(model), "all-linear", **kw)
    assert calls == [15]  # one call for every layer (the ranks 4, 6, 8 are grouped inside it)
    _without_many(monkeypatch, name)
    single = nlora.inject(copy.deepcopy(model), "all-linear", **kw)
    a, b = batched.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if "lora_N" in k:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * float(b[k].abs().max()) + 1e-30)
        else:
            assert torch.equal(a[k], b[k]), k  # A, B and the preserve_output base weights
    ranks = {n: layer.adapters["default"].config.rank for n, layer in adapter_layers(batched).items()}
    assert ranks == {n: layer.adapters["default"].config.rank for n, layer in adapter_layers(single).items()}
    assert sorted(set(ranks.values())) == [4, 6, 8]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.testing.assert_close(batched(x), single(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", BATCHED)
def test_conv1d_layers_give_the_same_model_as_layer_by_layer_init(name, monkeypatch):
    """HF Conv1D stores its weight (in, out): the batched path works on the same transposed view."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(24, 16), conv1d(24, 16), conv1d(16, 24), nn.Linear(24, 16)).to(torch.bfloat16)
    kw = dict(rank=5, init=name, seed=1, index="norm")
    batched = nlora.inject(copy.deepcopy(model), "all-linear", **kw)
    _without_many(monkeypatch, name)
    single = nlora.inject(copy.deepcopy(model), "all-linear", **kw)
    a, b = batched.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * float(b[k].float().abs().max()) + 1e-30)


@pytest.mark.parametrize("name", BATCHED)
def test_batched_inject_errors_name_the_module_and_change_nothing(name):
    model = Mixed(torch.float32)
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"blocks\.1\.tiny: rank=10"):
        nlora.inject(model, "all-linear", rank=6, init=name, rank_pattern={r"blocks\.1\.tiny": 10})
    assert_same_state(before, model)
    with torch.no_grad():
        model.blocks[2]["up"].weight[0, 0] = float("nan")
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"blocks\.2\.up: weight has NaN"):
        nlora.inject(model, "all-linear", rank=6, init=name)
    assert_same_state(before, model)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(fn) -> int:
    with _Count() as c:
        fn()
    return c.n


@pytest.mark.parametrize("name", BATCHED)
def test_op_count_of_the_r_by_r_work_does_not_grow_with_layers(name, monkeypatch):
    """Per layer only the slicing (and, for optimal, Cᵀ W) is left; the pseudo-inverses are one batched eigh."""
    spec = INITIALIZERS[name]

    def slope(run):
        counts = [_ops(lambda: run(n)) for n in (8, 16)]
        return (counts[1] - counts[0]) / 8

    ws = [torch.randn(24, 24, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    many = slope(lambda n: spec.many(ws[:n], [4] * n, scalings=[1.0] * n, generators=_gens(n)))
    loop = slope(lambda n: [spec.fn(w, 4, scaling=1.0, generator=g) for w, g in zip(ws[:n], _gens(n))])
    assert many <= 0.1 * loop, (many, loop)  # measured: 9-11 ops per layer against ~1300

    def inject_ops(n):
        return nlora.inject(nn.Sequential(*[nn.Linear(24, 24) for _ in range(n)]), "all-linear", rank=4, init=name,
                            seed=0)

    batched = slope(inject_ops)
    _without_many(monkeypatch, name)
    single = slope(inject_ops)
    assert batched <= 0.2 * single, (batched, single)  # measured: ~60 against ~1350


# -- what inject does with them ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pinv_and_optimal_preserve_the_output_at_init_and_unload_restores(name, dtype, mlp):
    mlp = mlp.to(dtype)
    x = torch.randn(6, 24, dtype=dtype, generator=torch.Generator().manual_seed(1))
    before = mlp(x).double()
    originals = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    nlora.inject(mlp, "all-linear", rank=4, init=name, index="norm", seed=0)
    assert all(layer.adapters["default"].config.preserve_output for layer in adapter_layers(mlp).values())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(mlp(x).double(), before, rtol=tol, atol=tol)
    nlora.unload(mlp)
    for n, p in mlp.named_parameters():
        torch.testing.assert_close(p, originals[n], rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("rcond", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_rcond_through_inject_is_refused_and_changes_nothing(name, rcond, mlp):
    before = state_hash(mlp)
    with pytest.raises(ValueError, match=r"rcond=.* must be a finite number >= 0"):
        nlora.inject(mlp, "all-linear", rank=3, init=name, rcond=rcond)
    assert_same_state(before, mlp)
    assert not adapter_layers(mlp)


def test_one_layer_refuses_factors_that_overflow_the_adapter_dtype():
    """``NLoRALinear(...)`` builds its factors through ``compute_factors``'s own check (``inject`` checks after building
    its adapters): a sampled 2 x 2 core of 1e-6·I gives a pinv core of 1e6, beyond fp16, refused with the layer's name;
    the base is left as it was."""
    base = nn.Linear(8, 8)
    with torch.no_grad():
        base.weight[:2, :2] = 1e-6 * torch.eye(2)
    before = base.weight.clone()
    message = r"^fc: init 'nystrom-pinv' gives factors that are not finite in torch\.float16"
    with pytest.raises(ValueError, match=message):
        NLoRALinear(base, rank=2, init="nystrom-pinv", adapter_dtype=torch.float16, name="fc")
    assert torch.equal(base.weight, before)


@pytest.mark.parametrize("value, ok", [(65504.0, True), (65519.0, True), (65520.0, False)])
def test_factors_must_be_finite_in_the_adapter_dtype(value, ok):
    """A (= W's first rows, init 'nystrom') holds ``value``: fp16's largest finite value and the largest that rounds
    to it (65519) pass, the first value that rounds to inf in fp16 is refused with the layer's name; the model is left
    as it was."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    with torch.no_grad():
        model[2].weight[1, 5] = value
    before = state_hash(model)
    if ok:
        nlora.inject(model, "all-linear", rank=3, init="nystrom", adapter_dtype=torch.float16)
        assert adapter_layers(model)["2"].adapters["default"].lora_A[1, 5] == value
    else:
        with pytest.raises(ValueError, match=r"^2: init 'nystrom' gives factors that are not finite in torch\.float16"):
            nlora.inject(model, "all-linear", rank=3, init="nystrom", adapter_dtype=torch.float16)
        assert_same_state(before, model)


# -- a user's init --------------------------------------------------------------------------------------------
@pytest.fixture
def user_init():
    """Registers ``test-first-slices`` (the paper's slices) and removes it afterwards."""
    calls = []

    @nlora.register_init("test-first-slices", data_driven=True, has_middle=True)
    def first_slices(weight, rank, *, scaling, generator=None, shift: float = 0.0):
        calls.append("fn")
        f = init_nystrom(weight, rank, scaling=scaling)
        return dataclasses.replace(f, N=f.N + shift)

    yield calls
    INITIALIZERS.pop("test-first-slices", None)


def test_register_init_gives_a_user_init_its_options_and_copies_what_it_returns(user_init):
    spec = get_init("test-first-slices")
    assert spec.options == ("shift",) and spec.data_driven and spec.has_middle and spec.many is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12))
    with pytest.warns(UserWarning, match="Pass preserve_output=True"):  # data-driven, keeps W, moves it a lot
        nlora.inject(model, "all-linear", rank=3, init="test-first-slices", shift=1.0)
    assert user_init == ["fn", "fn"]  # no batched form: once per layer
    for layer in adapter_layers(model).values():
        w = layer.base.weight
        assert torch.equal(layer.lora_A, w[:3]) and torch.equal(layer.lora_N, w[:3, :3] + 1.0)
    with pytest.raises(ValueError, match=r"init 'test-first-slices' has no option\(s\) \['index'\]"):
        nlora.inject(nn.Sequential(nn.Linear(4, 4)), "all-linear", rank=2, init="test-first-slices", index="first")

    returned = {}

    @nlora.register_init("test-views", data_driven=False, has_middle=True)
    def views(weight, rank, *, scaling, generator=None):
        big = torch.randn(2 * rank, weight.shape[1])
        returned.update(A=torch.randn(rank, weight.shape[1]), N=big[:rank, :rank], B=torch.randn(weight.shape[0], rank,
                                                                                                dtype=F64))
        return Factors(returned["A"], returned["N"], returned["B"])

    try:
        ad = NLoRALinear(nn.Linear(9, 12), rank=3, init="test-views").adapters["default"]
    finally:
        INITIALIZERS.pop("test-views")
    for name in "ANB":  # the adapter owns contiguous fp32 copies: training never writes into the init's tensors
        p, t = getattr(ad, f"lora_{name}"), returned[name]
        assert p.dtype == torch.float32 and p.is_contiguous() and p.untyped_storage().data_ptr() != \
            t.untyped_storage().data_ptr() and torch.equal(p, t.float())


def test_register_many_gives_a_user_init_a_batched_form_that_inject_calls_once(user_init):
    @nlora.register_many("test-first-slices")
    def first_slices_many(weights, ranks, *, scalings, generators, shift: float = 0.0):
        user_init.append(("many", len(weights)))
        return [init_nystrom(w, k, scaling=s) for w, k, s in zip(weights, ranks, scalings)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12), nn.Linear(12, 10))
    nlora.inject(model, "all-linear", rank=3, init="test-first-slices")
    assert user_init == [("many", 3)]
    for layer in adapter_layers(model).values():
        w = layer.base.weight
        assert torch.equal(layer.lora_A, w[:3]) and torch.equal(layer.lora_N, w[:3, :3])
        assert torch.equal(layer.lora_B, w[:, :3])
