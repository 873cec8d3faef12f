"""Property-based fuzzing: what the behaviour battery (tests/test_battery.py, four real architectures at fixed
shapes, fp32 references) cannot reach. Random layer shapes (out != in, tiny, odd), ranks 1..min(out, in), base dtypes
fp32/fp64/bf16/fp16, bias on/off, alpha, every init and index method, IntTune (train="middle"; with init="nystrom"
its A and B are read from the base weight):

* one layer: forward and disabled forward, merge -> unmerge, unload, each against a float64 reference with a rigorous
  rounding bound;
* adapter files: save -> load is bit-exact (Linear and HF Conv1D, two modules with their own rank and alpha,
  adapter_dtype, compact on/off, trained or not) and an export loaded by real PEFT gives the same outputs;
* the data-driven inits against their float64 formulas (Nyström cores, PiSSA's Eckart-Young optimum).

Budget: the "ci" profile (tests/conftest.py); HYPOTHESIS_PROFILE=long for more.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import nlora
from .conftest import assert_same_state, state_hash
from .model_zoo import one_thread  # noqa: F401 (autouse fixture)
from nlora.checkpoint import read_adapter_config
from nlora.inits import INITIALIZERS
from nlora.layer import weight_view
from nlora.model import adapter_layers
from nlora.nystrom import INDEX_METHODS
from nlora.peft import peft_factors

# One-layer examples take milliseconds: run 4x the profile's budget (ci: 100 examples a test, long: 4000).
FUZZ = settings(max_examples=4 * settings.default.max_examples)
# the paper's NLoRA (init="nystrom", base untouched) moves small random layers a lot at init, and inject says so
pytestmark = pytest.mark.filterwarnings("ignore:init 'nystrom' keeps the base weights:UserWarning")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def middle_allowed(init: str) -> bool:
    spec = nlora.get_init(init)
    return spec.has_middle and not spec.zero_delta


@st.composite
def layer_cases(draw) -> dict:
    out_f, in_f = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    init = draw(st.sampled_from(sorted(INITIALIZERS)))
    options = {}
    if init.startswith("nystrom"):
        options["index"] = draw(st.sampled_from(INDEX_METHODS))
    if init == "nystrom":
        options["preserve_output"] = draw(st.booleans())
    if init == "pissa":
        options["svd"] = draw(st.sampled_from(["full", "lowrank"]))
    return dict(out_f=out_f, in_f=in_f, rank=draw(st.integers(1, min(out_f, in_f))), init=init, options=options,
                train=draw(st.sampled_from(["all", "middle"])) if middle_allowed(init) else "all",
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                alpha=draw(st.one_of(st.none(), st.floats(0.25, 64))), seed=draw(st.integers(0, 2**31 - 1)))


def build(c: dict) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A one-Linear model in ``c["dtype"]``, an input batch, and the original weight (float64 copy)."""
    g = torch.Generator().manual_seed(c["seed"])
    linear = nn.Linear(c["in_f"], c["out_f"], bias=c["bias"])
    with torch.no_grad():
        linear.weight.copy_(torch.randn(c["out_f"], c["in_f"], generator=g) / c["in_f"] ** 0.5)
        if c["bias"]:
            linear.bias.copy_(torch.randn(c["out_f"], generator=g))
    model = nn.Sequential(linear).to(c["dtype"])
    x = torch.randn(3, c["in_f"], generator=g).to(c["dtype"])
    return model, x, model[0].weight.detach().double().clone()


def inject_and_train(model: nn.Sequential, c: dict) -> None:
    """Inject, then move every trainable factor as training would, so every delta is non-zero (IntTune: only N)."""
    nlora.inject(model, ["0"], rank=c["rank"], alpha=c["alpha"], init=c["init"], train=c["train"], seed=c["seed"],
                 **c["options"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    with torch.no_grad():
        for p in model[0].adapters["default"].trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 * p.abs().mean() + 0.05))


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's γ_n = n u / (1 - n u): the relative bound on n chained roundings (any summation order)."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def sub(dtype: torch.dtype) -> float:
    """The spacing of subnormals: below the smallest normal, rounding errors are absolute, not relative."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def terms(layer) -> list[tuple[tuple, float]]:
    """The adapter's ``((A, N, B), sign)`` products: the current one, and minus the initial one where the init
    rewrote the base weight (``preserve_output``)."""
    a = layer.adapters["default"]
    out = [(a.factors(layer.weight), 1.0)]
    if a.config.preserve_output:
        out.append(((a.init_A, a.init_N, a.init_B), -1.0))
    return out


def reference(model: nn.Sequential, x: torch.Tensor, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (float64) output ``x W0ᵀ + b + Σ s B N A x - [preserve] s B0 N0 A0 x`` and the magnitude
    ``|x||W|ᵀ + |b| + s|B||N||A||x| + ...`` that bounds its rounding error."""
    layer, xd = model[0], x.double()
    y = xd @ w0.T
    mag = xd.abs() @ (w0.abs() + layer.weight.double().abs()).T
    if layer.base.bias is not None:
        y = y + layer.base.bias.double()
        mag = mag + layer.base.bias.double().abs()
    s = layer.adapters["default"].scaling
    for (fa, fn, fb), sign in terms(layer):
        h, hm = xd @ fa.double().T, xd.abs() @ fa.double().abs().T
        if fn is not None:
            h, hm = h @ fn.double().T, hm @ fn.double().abs().T
        y = y + sign * s * (h @ fb.double().T)
        mag = mag + abs(s) * (hm @ fb.double().abs().T)
    return y, mag


def product_mag(factors: tuple, scaling: float) -> torch.Tensor:
    """``|s| |B| |N| |A|`` in float64: what rounding the product ``s B N A`` scales with (cancellation included)."""
    fa, fn, fb = (None if t is None else t.detach().double().abs() for t in factors)
    return abs(scaling) * (fb @ (fa if fn is None else fn @ fa))


def accumulation(c: dict, mag: torch.Tensor) -> torch.Tensor:
    """The rounding of one weight write ``W ± s B N A`` (``layer.add_to_weight``) before the final cast: the sum is
    accumulated in fp32 (fp64 for an fp64 weight) by ``addmm_``, which on tiny CPU matrices (below ~16 x 16) adds the
    r products into ``W`` one by one, each rounded at ``|W| + s|B||N||A|`` (``mag``); BLAS-sized layers round once."""
    return gamma(c["rank"] + 1, torch.promote_types(c["dtype"], torch.float32)) * mag


def finite_in(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    return all(bool(t.abs().max() < torch.finfo(dtype).max / 16) for t in tensors if t.numel())


# -- one layer against float64 ------------------------------------------------------------------------------------
@FUZZ
@given(layer_cases())
def test_forward_and_disabled_forward_match_float64_references(c):
    model, x, w0 = build(c)
    inject_and_train(model, c)
    y_ref, mag = reference(model, x, w0)
    assume(finite_in(c["dtype"], mag))
    bound = 2 * gamma(c["in_f"] + 2 * c["rank"] + 16, c["dtype"]) * mag + 64 * sub(c["dtype"])
    with torch.no_grad():
        y = model(x)
        with nlora.disable_adapter(model):
            y_off = model(x).double()
    assert y.dtype == c["dtype"]
    err = (y.double() - y_ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}"
    bias = model[0].base.bias.double() if c["bias"] else 0.0
    err = (y_off - (x.double() @ w0.T + bias)).abs()  # disabled: the original layer (init residual given back)
    assert (err <= bound).all(), f"disabled: max err {err.max():.3g}"


@FUZZ
@given(layer_cases())
def test_merge_unmerge_round_trip(c):
    model, x, w0 = build(c)
    inject_and_train(model, c)
    layer = model[0]
    a = layer.adapters["default"]
    _, mag = reference(model, x, w0)
    delta = layer.delta_weight().double()
    prod = product_mag(a.factors(layer.weight), a.scaling)
    assume(finite_in(c["dtype"], mag, delta))
    w_pre = layer.weight.double().clone()
    with torch.no_grad():
        y = model(x).double()
        nlora.merge(model)
        # the merged weight is W + ΔW, accumulated in fp32 (fp64) and rounded once to the weight's dtype; ΔW (the
        # reference) is itself s B N A in fp32 (fp64 for an fp64 weight)
        w_m = layer.weight.double()
        u = torch.finfo(c["dtype"]).eps / 2
        wbound = (u * (w_pre + delta).abs() + accumulation(c, w_pre.abs() + prod)
                  + gamma(2 * c["rank"] + 4, torch.float32) * prod)
        assert ((w_m - (w_pre + delta)).abs() <= 2 * wbound + 64 * sub(c["dtype"])).all()
        y_m = model(x).double()
        n = c["in_f"] + 2 * c["rank"] + 16
        assert ((y_m - y).abs() <= 4 * gamma(n, c["dtype"]) * (mag + x.double().abs() @ delta.abs().T)
                + 64 * sub(c["dtype"])).all()
        nlora.unmerge(model)
        w_back = layer.weight.double()
        unmerge = u * w_back.abs() + accumulation(c, w_m.abs() + prod)
        assert ((w_back - w_pre).abs() <= 2 * (wbound + unmerge) + 64 * sub(c["dtype"])).all()
        assert layer.merged_adapters == ()
        y_back = model(x).double()  # IntTune kept the ORIGINAL slices as A and B, not the merged weight's
        assert ((y_back - y).abs() <= 4 * gamma(n, c["dtype"]) * (mag + x.double().abs() @ delta.abs().T)
                + 64 * sub(c["dtype"])).all()


@FUZZ
@given(layer_cases(), st.booleans())
def test_unload_gives_back_the_original_weight(c, merge_first):
    model, x, w0 = build(c)
    inject_and_train(model, c)
    layer = model[0]
    a = layer.adapters["default"]
    preserve = a.config.preserve_output
    delta = layer.delta_weight().double()
    delta0 = layer.delta_weight(initial=True).double() if preserve else 0
    assume(finite_in(c["dtype"], w0.abs() + delta.abs()))
    prod = product_mag(a.factors(layer.weight), a.scaling)
    prod0 = product_mag((a.init_A, a.init_N, a.init_B), a.scaling) if preserve else 0
    if merge_first:
        nlora.merge(model)
    plain = nlora.unload(model)
    assert isinstance(plain[0], nn.Linear)
    w = plain[0].weight.detach().double()
    if not merge_first and not preserve:
        assert torch.equal(w, w0)  # never touched: bit-identical
    else:  # at most three roundings (residual, merge, unmerge/unload), each <= u of the largest magnitude involved
        u = torch.finfo(c["dtype"]).eps / 2
        scale = w0.abs() + delta.abs() + (delta0.abs() if preserve else 0)
        # the init's residual (one addmm_) and unload's add-back form s B0 N0 A0 by different GEMMs: each rounds it
        # by up to γ_2k s |B0| |N0| |A0| (not u |delta0|: the product can cancel), and the two need not agree
        gemm = 2 * gamma(2 * c["rank"] + 1, c["dtype"]) * prod0
        writes = 3 * accumulation(c, w0.abs() + prod + prod0)
        assert ((w - w0).abs() <= 4 * u * scale + gemm + writes + 64 * sub(c["dtype"])).all()


# -- adapter files: save/load and export-to-PEFT round trips -------------------------------------------------------
# tests/test_checkpoint.py fuzzes save/load of one biased nn.Linear and tests/test_peft.py the exported factors' maths.
# These extend both: bias on/off, alpha, fp16/fp64 bases, HF Conv1D, two modules with their own rank and alpha
# (rank_pattern/alpha_pattern), adapter_dtype, compact on/off, untrained or trained as an optimizer would (frozen
# factors never move), the merged state after load, and the export loaded by real PEFT.
@st.composite
def adapter_cases(draw) -> dict:
    c = draw(layer_cases())
    c["conv1d"] = draw(st.booleans())
    c["rank2"] = draw(st.integers(1, min(c["out_f"], c["in_f"])))
    c["alpha2"] = draw(st.one_of(st.none(), st.floats(0.25, 64)))
    c["adapter_dtype"] = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    c["compact"] = draw(st.booleans())
    c["trained"] = draw(st.booleans())
    return c


class Pair(nn.Module):
    """Two layers ``a``, ``b`` of the same shape side by side (Linear or HF Conv1D): ``cat(a(x), b(x))``."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(c["seed"])
        self.a, self.b = self._layer(c, g), self._layer(c, g)

    @staticmethod
    def _layer(c: dict, g: torch.Generator) -> nn.Module:
        if c["conv1d"]:
            layer = pytest.importorskip("transformers.pytorch_utils").Conv1D(c["out_f"], c["in_f"])  # weight (in, out)
        else:
            layer = nn.Linear(c["in_f"], c["out_f"], bias=c["bias"])
        with torch.no_grad():
            weight_view(layer).copy_(torch.randn(c["out_f"], c["in_f"], generator=g) / c["in_f"] ** 0.5)
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(c["out_f"], generator=g) if c["bias"] or c["conv1d"] else 0)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=-1)


def adapted_pair(c: dict, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(the untouched model, a copy with the adapter injected on ``a`` and ``b``, trained if ``c["trained"]``)."""
    original = Pair(c).to(dtype)
    model = copy.deepcopy(original)
    nlora.inject(model, ["a", "b"], rank=c["rank"], alpha=c["alpha"], init=c["init"], train=c["train"], seed=c["seed"],
                 rank_pattern={"b": c["rank2"]}, alpha_pattern={} if c["alpha2"] is None else {"b": c["alpha2"]},
                 adapter_dtype=c["adapter_dtype"], **c["options"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    with torch.no_grad():
        for layer in (model.a, model.b):
            for p in layer.adapters["default"].trainable_parameters() if c["trained"] else ():
                p.add_((torch.randn(p.shape, generator=g) * (0.5 * p.float().abs().mean() + 0.05)).to(p.dtype))
    return original, model


def buffers(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {f"{n}.{b}": getattr(l.adapters["default"], b) for n, l in adapter_layers(model).items()
            for b in ("init_A", "init_N", "init_B", "rows", "cols")}


def expected_from_base(c: dict, layer) -> set[str]:
    """The factors a compact file re-slices from the base weight instead of storing them (the compact rule)."""
    config = layer.adapters["default"].config
    if not (c["compact"] and config.init.startswith("nystrom")):
        return set()
    if config.preserve_output:
        return {"init_A", "init_B"} | ({"lora_A", "lora_B"} if config.train == "middle" else set())
    return {"lora_A", "lora_B"} if config.reads_base else set()


def one_element_conv1d_slice(c: dict) -> bool:
    """A compact save of IntTune reading a Conv1D of in_features 1: A = weight.T[:1] is one element (stride 2)."""
    reads_base = c["train"] == "middle" and c["init"] == "nystrom" and not c["options"].get("preserve_output")
    return c["conv1d"] and c["in_f"] == 1 and reads_base and c["compact"] and c["options"].get("index") == "first"


def case(**kw) -> dict:
    """An explicit adapter case (the regressions below), defaults filled in."""
    base = dict(options={}, train="all", dtype=torch.float32, bias=True, alpha=None, seed=0, conv1d=False,
                alpha2=None, adapter_dtype=torch.float32, compact=True, trained=False)
    base.update(kw)
    base.setdefault("rank2", base["rank"])
    return base


@FUZZ
@given(adapter_cases())
# The paper's IntTune on a Conv1D: A and B are read from the transposed weight, only N is stored.
@example(case(out_f=7, in_f=8, rank=3, init="nystrom", train="middle", conv1d=True, trained=True))
# Regression: Nyström slices of a Conv1D weight are transposed views; kept as parameters in that layout, matmul
# rounding changed, so a saved-and-loaded adapter's output differed in the last bit (86 of the 650 Conv1D shapes up
# to 13 x 13, e.g. this one).
@example(case(out_f=7, in_f=8, rank=3, init="nystrom", conv1d=True, compact=False))
# Regressions found by the port to the redesign (since fixed). save_adapter handed safetensors tensors sharing
# memory: the frozen A, B of a preserve_output IntTune adapter are its init_A, init_B (pissa; Nyström stored in full),
# and A = W[:r], B = W[:, :r] of an IntTune adapter reading the base are one storage when rank == in_features ...
@example(case(out_f=6, in_f=8, rank=2, init="pissa", train="middle", trained=True))
@example(case(out_f=6, in_f=8, rank=2, init="nystrom-pinv", train="middle", compact=False, trained=True))
@example(case(out_f=6, in_f=2, rank=2, init="nystrom", train="middle", compact=False, trained=True))
# ... a compact preserve_output Nyström file in an adapter_dtype less precise than the base did not load (the slices'
# digest was taken at the base dtype at save, of the base's own slices at load) ...
@example(case(out_f=40, in_f=24, rank=4, init="nystrom-pinv", train="middle", adapter_dtype=torch.bfloat16,
              trained=True))
@example(case(out_f=40, in_f=24, rank=4, init="nystrom-pinv", adapter_dtype=torch.bfloat16, trained=True))
# ... and the digest of a rank-1 IntTune slice of a Conv1D (B = W[:, :1], stride (1, out)) could not view it as bytes.
@example(case(out_f=8, in_f=6, rank=1, init="nystrom", train="middle", conv1d=True, trained=True))
def test_save_load_round_trip_is_bit_exact(c):
    original, model = adapted_pair(c, c["dtype"])
    x = torch.randn(3, c["in_f"], generator=torch.Generator().manual_seed(c["seed"] + 2)).to(c["dtype"])
    with tempfile.TemporaryDirectory() as tmp:
        path = nlora.save_adapter(model, Path(tmp) / "a", compact=c["compact"])
        records = read_adapter_config(path)["modules"]
        fresh = copy.deepcopy(original)
        nlora.load_adapter(fresh, path)
    for name, layer in adapter_layers(model).items():  # compact: what is the base's is not stored
        assert set(records[name]["from_base"]) == expected_from_base(c, layer), records[name]
        assert not set(records[name]["stored"]) & expected_from_base(c, layer)
    assert_same_state(state_hash(model), fresh)
    a, b = buffers(model), buffers(fresh)
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        assert a[k] is None or (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])), k
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
           {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n: l.adapters["default"].config.rank for n, l in adapter_layers(fresh).items()} == \
           {"a": c["rank"], "b": c["rank2"]}
    assert all(l.adapters["default"].reads_base == l.adapters["default"].config.reads_base
               for l in adapter_layers(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        with nlora.disable_adapter(model), nlora.disable_adapter(fresh):
            assert torch.equal(fresh(x), model(x))
        nlora.merge(model)
        nlora.merge(fresh)
        assert_same_state(state_hash(model), fresh)  # merging a loaded adapter gives the same weights, bitwise
    for layer in (model.a, model.b, fresh.a, fresh.b):  # own factors: contiguous copies, never the base's memory
        for t in (layer.adapters["default"].lora_A, layer.adapters["default"].lora_B):
            assert t.is_contiguous() and t.untyped_storage().data_ptr() != \
                layer.base.weight.untyped_storage().data_ptr()


def test_compact_save_of_a_one_element_conv1d_slice(tmp_path):
    """A = weight.T[:1] of a Conv1D with in_features 1 is one element of stride 2: its digest still works."""
    c = case(out_f=2, in_f=1, rank=1, init="nystrom", train="middle", conv1d=True, options={"index": "first"})
    assert one_element_conv1d_slice(c)
    original, model = adapted_pair(c, torch.float32)
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, nlora.save_adapter(model, tmp_path / "a"))
    assert_same_state(state_hash(model), fresh)


@FUZZ
@given(adapter_cases(), st.sampled_from([torch.float32, torch.float64]),
       st.sampled_from([torch.float32, torch.float64]))
def test_export_is_reproduced_by_peft(c, base_dtype, file_dtype):
    peft = pytest.importorskip("peft")
    original, model = adapted_pair(c, base_dtype)
    x = torch.randn(4, c["in_f"], generator=torch.Generator().manual_seed(c["seed"] + 2)).to(base_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        nlora.export_peft(model, Path(tmp) / "p", dtype=file_dtype)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(Path(tmp) / "p")).eval()
    k = {n: 2 if l.adapters["default"].config.preserve_output else 1 for n, l in adapter_layers(model).items()}
    assert pm.base_model.model.a.r["default"] == c["rank"] * k["a"]
    assert pm.base_model.model.b.r["default"] == c["rank2"] * k["b"]
    with torch.no_grad():
        y, y_peft = model(x).double(), pm(x).double()
    # both compute x W0ᵀ + b + s B' A' x (nlora: on the residual weight, with N unfolded) with fp32 somewhere in the
    # chain; the bound is that of fp32 roundings on the magnitudes of every term, for either computation
    xd, mags = x.double().abs(), []
    for name in ("a", "b"):
        layer, twin = getattr(model, name), getattr(original, name)
        s = layer.adapters["default"].scaling
        fa, fb = peft_factors(layer.adapters["default"], layer.weight, torch.float64)
        mag = xd @ (weight_view(twin).double().abs() + layer.weight.double().abs()).T
        mag = mag + abs(s) * ((xd @ fa.abs().T) @ fb.abs().T)
        for (fa_, fn_, fb_), _ in terms(layer):
            h = xd @ fa_.double().abs().T
            h = h @ fn_.double().abs().T if fn_ is not None else h
            mag = mag + abs(s) * (h @ fb_.double().abs().T)
        mags.append(mag + (twin.bias.double().abs() if twin.bias is not None else 0))
    mag = torch.cat(mags, dim=-1)
    n = c["in_f"] + 4 * max(c["rank"], c["rank2"]) + 16
    err = (y - y_peft).abs()
    assert (err <= 4 * gamma(n, torch.float32) * mag + 64 * sub(torch.float32)).all(), f"max err {err.max():.3g}"


# -- the data-driven inits against float64 ------------------------------------------------------------------------
shapes = st.tuples(st.integers(1, 16), st.integers(1, 16))


@FUZZ
@given(shapes, st.data())
def test_nystrom_inits_equal_their_float64_formulas(shape, data):
    """nystrom: s B N A = C U R (the paper's code); nystrom-pinv: C U⁺ R with U⁺ cut at 0.1 σ_max, exact above the
    cut; nystrom-optimal: the float64 optimum C C⁺ W R⁺ R for the same C and R, and no other core does better."""
    rank = data.draw(st.integers(1, min(shape)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    index = data.draw(st.sampled_from(INDEX_METHODS))
    scaling = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()
    f = {name: INITIALIZERS[name].fn(w.float(), rank, scaling=scaling, generator=torch.Generator().manual_seed(seed),
                                     index=index)
         for name in ("nystrom", "nystrom-pinv", "nystrom-optimal")}
    rows, cols = f["nystrom"].rows, f["nystrom"].cols
    assert all(torch.equal(x.rows, rows) and torch.equal(x.cols, cols) for x in f.values())  # same generator, same sets
    c, u, r = w[:, cols], w[rows][:, cols], w[rows, :]
    delta = {k: scaling * v.B.double() @ v.N.double() @ v.A.double() for k, v in f.items()}
    torch.testing.assert_close(delta["nystrom"], scaling * c @ u @ r, rtol=1e-5, atol=1e-5)  # the paper's N = U
    sv = torch.linalg.svdvals(u)
    assume(sv[-1] > 1e-3 * sv[0])  # fp32 and fp64 pseudo-inverses agree only on decently conditioned cores
    assume(((sv / sv[0] / 0.1 - 1).abs() > 0.03).all())  # ... and away from the 0.1 cutoff (its 2.5% soft band)
    ref_pinv = c @ torch.linalg.pinv(u, rtol=0.1) @ r
    cond = (sv[0] / sv[sv > 0.1 * sv[0]][-1]).item()  # <= 10: the truncated pinv is exact above the cut
    torch.testing.assert_close(delta["nystrom-pinv"], ref_pinv, rtol=0,
                               atol=1e-4 * cond**2 * ref_pinv.abs().max().item() + 1e-6)
    best = c @ (torch.linalg.pinv(c) @ w @ torch.linalg.pinv(r)) @ r
    err_opt = torch.linalg.matrix_norm(w - delta["nystrom-optimal"]).item()
    err_best = torch.linalg.matrix_norm(w - best).item()
    # fp32 pseudo-inverses of C and R lose ~u·cond(C)·cond(R) relative accuracy
    cond_cr = (torch.linalg.cond(c) * torch.linalg.cond(r)).item()
    assume(cond_cr < 1e4)
    slack = 1e-6 * cond_cr * torch.linalg.matrix_norm(w).item()
    assert err_opt <= err_best + slack  # the optimal core reaches the float64 optimum for these C and R
    for other in ("nystrom", "nystrom-pinv"):  # and no other core for the same C and R does better
        assert err_opt <= torch.linalg.matrix_norm(w - delta[other]).item() + slack


@FUZZ
@given(shapes, st.data())
def test_pissa_is_the_best_rank_r_approximation(shape, data):
    rank = data.draw(st.integers(1, min(shape)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    scaling = data.draw(st.sampled_from([0.5, 1.0, 4.0]))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()
    f = INITIALIZERS["pissa"].fn(w.float(), rank, scaling=scaling, svd="full")
    delta = scaling * f.B.double() @ f.N.double() @ f.A.double()
    sv = torch.linalg.svdvals(w)
    eckart_young = sv[rank:].square().sum().sqrt().item()  # the least Frobenius error of any rank-r matrix
    norm = torch.linalg.matrix_norm(w).item()
    # fp32 SVD: backward stable, the reconstruction is off by a small multiple of n·u·||W|| (n = max(shape))
    tol = 4 * max(shape) * torch.finfo(torch.float32).eps * norm
    assert torch.linalg.matrix_norm(w - delta).item() == pytest.approx(eckart_young, rel=1e-4, abs=tol)
    assert torch.linalg.matrix_rank(delta, rtol=1e-6) <= rank
