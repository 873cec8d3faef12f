"""The batched Nyström inits (``InitSpec.many``): equal to the per-layer initialiser layer by layer (indices,
slices and cores, for mixed shapes, ranks, scalings, index methods, dtypes, rcond values, rank-deficient and zero
weights), inject gives the same model with and without them, a failed factorisation poisons only its own layer, and
the op count of one inject grows by far fewer ops per layer than layer-by-layer initialisation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nlora
from nlora.inits import INITIALIZERS
from nlora.model import adapter_layers

from .conftest import assert_same_state, state_hash
from .model_zoo import one_thread  # noqa: F401 (autouse fixture)

BATCHED = ["nystrom-pinv", "nystrom-optimal"]
LOW = [torch.float32, torch.bfloat16, torch.float16]


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


def _assert_same_factors(got, want):
    for k in ("rows", "cols", "A", "B"):
        assert torch.equal(getattr(got, k), getattr(want, k)), k
    assert got.N.dtype == want.N.dtype == torch.float32
    assert torch.isfinite(got.N).all()
    # fp64 maths, rounded to fp32 at the end: equal up to the last bits of fp32 (bitwise on the CI machine)
    torch.testing.assert_close(got.N, want.N, rtol=1e-5, atol=1e-6 * float(want.N.abs().max()) + 1e-30)


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("index", ["first", "random", "norm"])
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
def test_many_with_the_svd_solver_loops_over_the_exact_truncation(name):
    spec = INITIALIZERS[name]
    ws, ranks, scalings = _weights(torch.float32, seed=2)
    got = spec.many(ws, ranks, scalings=scalings, generators=_gens(len(ws)), index="norm", solver="svd")
    for w, k, s, g, f in zip(ws, ranks, scalings, _gens(len(ws)), got):
        want = spec.fn(w, k, scaling=s, generator=g, index="norm", solver="svd")
        assert all(torch.equal(getattr(f, a), getattr(want, a)) for a in ("rows", "cols", "A", "N", "B"))


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("bad, match", [({"solver": "qr"}, "solver='qr'"), ({"rcond": -1.0}, "rcond=-1.0"),
                                        ({"index": "best"}, "index='best'")])
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
        if "lora_N" in k or "init_N" in k:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * float(b[k].abs().max()) + 1e-30)
        else:
            assert torch.equal(a[k], b[k]), k  # indices, A, B and the preserve_output base weights
    la, lb = adapter_layers(batched), adapter_layers(single)
    assert {n: l.adapters["default"].rank for n, l in la.items()} == {n: l.adapters["default"].rank
                                                                       for n, l in lb.items()}
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.testing.assert_close(batched(x), single(x), rtol=1e-3, atol=1e-3)


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
    with pytest.raises(ValueError, match=r"blocks\.2\.up"):
        nlora.inject(model, "all-linear", rank=6, init=name)
    assert_same_state(before, model)


def _fail_batch_entry(monkeypatch, j: int):
    """cholesky_ex reports a failed pivot for batch entry ``j`` of batched calls only."""
    real = torch.linalg.cholesky_ex

    def failing(a, **kw):
        chol, info = real(a, **kw)
        if a.dim() == 3 and a.shape[0] > 2:
            info = info.clone()
            info[j] = 1
        return chol, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)


@pytest.mark.parametrize("name", BATCHED)
def test_a_failed_factorisation_poisons_only_its_own_layer(name, monkeypatch):
    spec = INITIALIZERS[name]
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(20, 16, generator=g) for _ in range(5)]  # one shape: the batch keeps the layer order
    want = [spec.fn(w, 4, scaling=1.0) for w in ws]
    _fail_batch_entry(monkeypatch, 2)  # pinv: U of layer 2; optimal: CᵀC of layer 2
    got = spec.many(ws, [4] * 5, scalings=[1.0] * 5, generators=[None] * 5)
    for i, (f, w) in enumerate(zip(got, want)):
        if i == 2:
            assert torch.isnan(f.N).all()
        else:
            _assert_same_factors(f, w)
    model = nn.Sequential(*[nn.Linear(16, 20) for _ in range(5)])
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"^2: init .* not finite"):
        nlora.inject(model, "all-linear", rank=4, init=name)
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
    spec = INITIALIZERS[name]

    def slopes(run):
        counts = [_ops(lambda: run(n)) for n in (8, 16)]
        assert counts == [_ops(lambda: run(n)) for n in (8, 16)]  # deterministic
        return (counts[1] - counts[0]) / 8

    ws = [torch.randn(24, 24, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    many = slopes(lambda n: spec.many(ws[:n], [4] * n, scalings=[1.0] * n, generators=_gens(n)))
    loop = slopes(lambda n: [spec.fn(w, 4, scaling=1.0, generator=g) for w, g in zip(ws[:n], _gens(n))])
    # per layer only the slicing (and, for optimal, the products Cᵀ W Rᵀ and Grams) are left; the ridge maths
    # (Gram, σ_max bound, Cholesky, solves, poison) are one batch
    assert many <= 0.3 * loop, (many, loop)

    def inject_ops(n):
        return nlora.inject(nn.Sequential(*[nn.Linear(24, 24) for _ in range(n)]), "all-linear", rank=4, init=name,
                            seed=0)

    batched = slopes(inject_ops)
    _without_many(monkeypatch, name)
    single = slopes(inject_ops)
    assert batched <= 0.6 * single, (batched, single)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_makes_no_host_sync_on_cuda_and_matches_the_cpu(name, dtype):
    spec = INITIALIZERS[name]
    ws, ranks, scalings = _weights(dtype, seed=4)
    # optimal's default rcond=None is a ridge at eps level: for the rank-deficient fp32 layers the result is then
    # rounding noise amplified ~1e10 (GPU and CPU GEMMs round differently); compare at a meaningful ridge
    opts = {"rcond": 1e-3} if name == "nystrom-optimal" else {}
    cuda = [w.cuda() for w in ws]
    spec.many(cuda, ranks, scalings=scalings, generators=[None] * len(ws), **opts)  # warm-up (handles, workspaces)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = spec.many(cuda, ranks, scalings=scalings, generators=[None] * len(ws), **opts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w, k, s, f in zip(ws, ranks, scalings, got):
        want = spec.fn(w, k, scaling=s, **opts)
        assert torch.equal(f.A.cpu(), want.A) and torch.equal(f.B.cpu(), want.B)
        # Compare what the core is for, s·B N A: with rank-deficient slices the ridge core's components along their
        # null directions are rounding noise over a tiny ridge (GPU and CPU round differently), and C, R cancel them.
        def delta(fac):
            return s * (fac.B.double().cpu() @ fac.N.double().cpu() @ fac.A.double().cpu())

        scale = float(w.double().norm()) + 1e-30
        assert float((delta(f) - delta(want)).norm()) <= 1e-3 * scale


@pytest.mark.parametrize("value, ok", [(65504.0, True), (65520.0, False),
                                       (float(torch.finfo(torch.float32).max), False)])
def test_the_one_pass_finiteness_check_is_exact_at_the_adapter_dtype_boundary(value, ok):
    """A (= W's first rows, init 'nystrom') holds ``value``: fp16's largest finite value passes, the first value that
    rounds to inf in fp16 is refused with the layer's name; the model is left as it was."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    with torch.no_grad():
        model[2].weight[1, 5] = value
    before = state_hash(model)
    if ok:
        nlora.inject(model, "all-linear", rank=3, init="nystrom", adapter_dtype=torch.float16)
        assert adapter_layers(model)["2"].adapters["default"].lora_A[1, 5] == value
    else:
        with pytest.raises(ValueError, match=r"^2: init 'nystrom' gives lora_A values that are not finite"):
            nlora.inject(model, "all-linear", rank=3, init="nystrom", adapter_dtype=torch.float16)
        assert_same_state(before, model)


def test_a_finite_factor_whose_sum_overflows_is_accepted():
    """sum |A| overflows fp32 though every value is finite: the per-layer exact check runs and accepts it."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    big = float(torch.finfo(torch.float32).max) / 2
    with torch.no_grad():
        model[1].weight[:3, :3] = big
    nlora.inject(model, "all-linear", rank=3, init="nystrom", preserve_output=False)
    assert adapter_layers(model)["1"].adapters["default"].lora_A[:3, :3].eq(big).all()


def test_weights_finite_flags_each_weight_of_mixed_dtypes_and_views():
    """One multi-tensor pass per (device, dtype): NaN and Inf are flagged per weight, a finite weight whose |w| sum
    overflows fp32 is re-checked and passes, transposed views (HF Conv1D) and fp64/bf16 weights are read as they are."""
    from nlora.layer import weights_finite

    big = float(torch.finfo(torch.float32).max) / 2
    ws = [torch.randn(5, 7), torch.randn(7, 5).T, torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(3, 6).double(),
          torch.full((3, 3), big), torch.randn(6, 6), torch.randn(6, 6, dtype=torch.bfloat16)]
    ws[1][2, 3] = float("nan")
    ws[3][0, 0] = float("-inf")
    ws[6][1, 1] = float("inf")
    assert weights_finite(ws) == [True, False, True, False, True, True, False]
    assert weights_finite([]) == []


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


def test_register_many_gives_a_custom_init_a_batched_form_that_inject_calls_once():
    """A user's init with ``@nlora.register_many``: inject makes one batched call for all layers and the adapters
    get exactly its factors; without the batched form inject calls the per-layer function instead."""
    from nlora.inits import init_nystrom

    calls = []

    @nlora.register_init("test-first-slices", data_driven=True, has_middle=True)
    def first_slices(weight, rank, *, scaling, generator=None):
        calls.append("fn")
        return init_nystrom(weight, rank, scaling=scaling)

    @nlora.register_many("test-first-slices")
    def first_slices_many(weights, ranks, *, scalings, generators):
        calls.append(("many", len(weights)))
        return [init_nystrom(w, k, scaling=s) for w, k, s in zip(weights, ranks, scalings)]

    try:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(12, 10), nn.Linear(10, 12), nn.Linear(12, 10)])
        nlora.inject(model, "all-linear", rank=3, init="test-first-slices")
        assert calls == [("many", 3)]
        for layer in adapter_layers(model).values():
            w = layer.base.weight
            assert torch.equal(layer.lora_A, w[:3]) and torch.equal(layer.lora_N, w[:3, :3])
            assert torch.equal(layer.lora_B, w[:, :3])
        calls.clear()
        nlora.INITIALIZERS["test-first-slices"] = dataclasses.replace(nlora.INITIALIZERS["test-first-slices"], many=None)
        nlora.inject(nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12)), "all-linear", rank=3,
                     init="test-first-slices")
        assert calls == ["fn", "fn"]
    finally:
        nlora.INITIALIZERS.pop("test-first-slices", None)
