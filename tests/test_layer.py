"""NLoRALinear: forward against a float64 reference, init behaviour, IntTune freezing, merge/unmerge."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nlora
from nlora import NLoRALinear

ALL_INITS = ["lora", "gaussian", "slora", "nystrom", "nystrom-pinv", "nystrom-optimal", "pissa"]


def make_linear(out_f=20, in_f=12, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def perturb(layer: NLoRALinear, seed=1):
    """Give every adapter factor random values, so that B = 0 inits are tested with a non-zero delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("init", ALL_INITS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64_reference(init, bias):
    layer = NLoRALinear(make_linear(bias=bias), rank=5, alpha=10, init=init)
    perturb(layer)
    x = torch.randn(3, 4, 12)
    a = layer.adapters["default"]
    w = layer.base.weight.double()
    delta = a.scaling * a.lora_B.double() @ (a.lora_N.double() if a.lora_N is not None else torch.eye(5, dtype=torch.float64)) @ a.lora_A.double()
    ref = x.double() @ (w + delta).T + (layer.base.bias.double() if bias else 0)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert layer.scaling == 2.0 and a.rank == 5


def test_parameter_layout_and_alpha_default():
    layer = NLoRALinear(make_linear(out_f=20, in_f=12), rank=4, init="slora")
    assert layer.lora_A.shape == (4, 12) and layer.lora_N.shape == (4, 4) and layer.lora_B.shape == (20, 4)
    assert all(isinstance(p, nn.Parameter) for p in (layer.lora_A, layer.lora_N, layer.lora_B))
    assert layer.scaling == 1.0  # alpha defaults to r, as in the paper
    assert NLoRALinear(make_linear(), rank=4, init="lora").lora_N is None
    assert not layer.base.weight.requires_grad


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views (the base weight's transpose) allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("init", ["slora", "nystrom", "lora"])
def test_forward_never_materialises_the_delta(init):
    layer = NLoRALinear(make_linear(out_f=33, in_f=17), rank=3, init=init)
    x = torch.randn(5, 17, requires_grad=True)
    with _ShapeRecorder() as rec:
        layer(x).sum().backward()
    assert (33, 17) not in rec.shapes and (17, 33) not in rec.shapes, rec.shapes


@pytest.mark.parametrize("init,opts", [(i, {"index": x}) for i in ("nystrom", "nystrom-pinv", "nystrom-optimal")
                                       for x in ("first", "random", "norm")]
                         + [("pissa", {"svd": "full"}), ("pissa", {"svd": "lowrank"})])
def test_preserve_output_leaves_outputs_unchanged(init, opts):
    base = make_linear(out_f=24, in_f=16)
    x = torch.randn(6, 16)
    y0 = base(x)
    layer = NLoRALinear(base, rank=6, init=init, preserve_output=True, generator=torch.Generator().manual_seed(0), **opts)
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.base.weight @ x.T, y0.T - base.bias[:, None])  # the base weight did move


def test_faithful_nystrom_changes_output_by_its_delta():
    base = make_linear(out_f=24, in_f=16)
    w0 = base.weight.detach().clone()
    x = torch.randn(6, 16)
    y0 = base(x)
    layer = NLoRALinear(base, rank=4, init="nystrom")
    assert torch.equal(layer.base.weight, w0)  # base weight untouched, as in the paper's code
    delta = w0[:, :4] @ w0[:4, :4] @ w0[:4, :]
    torch.testing.assert_close(layer(x) - y0, x @ delta.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["lora", "gaussian", "slora"])
def test_zero_b_inits_leave_outputs_bit_identical(init):
    base = make_linear()
    x = torch.randn(6, 12)
    y0 = base(x)
    assert torch.equal(NLoRALinear(base, rank=4, init=init)(x), y0)


@pytest.mark.parametrize("init", ["nystrom", "nystrom-optimal", "pissa"])
def test_inttune_trains_only_the_middle_matrix(init):
    layer = NLoRALinear(make_linear(), rank=4, init=init, train="middle")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.default.lora_N"]
    a0, b0, n0, w0 = (t.detach().clone() for t in (layer.lora_A, layer.lora_B, layer.lora_N, layer.base.weight))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)  # all params offered on purpose
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 12)).square().mean().backward()
        opt.step()
    assert torch.equal(layer.lora_A, a0) and torch.equal(layer.lora_B, b0) and torch.equal(layer.base.weight, w0)
    assert not torch.equal(layer.lora_N, n0)


def test_inttune_needs_a_middle_matrix_and_a_nonzero_b():
    with pytest.raises(ValueError, match="no middle matrix"):
        NLoRALinear(make_linear(), rank=4, init="lora", train="middle")
    with pytest.raises(ValueError, match="never get a gradient"):  # slora's B = 0 stays frozen: N could not learn
        NLoRALinear(make_linear(), rank=4, init="slora", train="middle")


@pytest.mark.parametrize("init", ALL_INITS)
def test_merge_equals_unmerged_and_unmerge_restores(init):
    layer = NLoRALinear(make_linear(), rank=4, init=init)
    perturb(layer)
    x = torch.randn(5, 12)
    y = layer(x)
    w_before = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w_before, rtol=0, atol=1e-6)  # fp32: one rounding each way
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_merge_rounds_an_fp32_delta_once_into_bf16():
    layer = NLoRALinear(make_linear(dtype=torch.bfloat16), rank=4, init="slora")
    perturb(layer)
    w0 = layer.base.weight.detach().clone()
    a = layer.adapters["default"]
    expected = (w0.float() + a.scaling * a.lora_B @ a.lora_N @ a.lora_A).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base.weight, expected)
    layer.unmerge()
    # bf16 keeps 8 bits of mantissa: the round trip is within 2 ulps of the larger of |W| and |delta|
    scale = w0.float().abs() + (a.scaling * a.lora_B @ a.lora_N @ a.lora_A).abs()
    assert ((layer.base.weight.float() - w0.float()).abs() <= scale * 2 ** -7).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", ["nystrom-pinv", "nystrom-optimal", "pissa"])
def test_a_low_precision_residual_is_the_difference_rounded_once(dtype, init):
    """preserve_output on a bf16/fp16 weight: W_res = W0 - s B0 N0 A0, formed at fp32 precision and rounded once into
    the weight's dtype: within half an ulp of the exact difference (plus fp32-level error)."""
    base = make_linear(out_f=24, in_f=16, dtype=dtype)
    w_orig = base.weight.detach().double().clone()
    layer = NLoRALinear(base, rank=5, init=init)
    a = layer.adapters["default"]
    delta = a.scaling * a.init_B.double() @ a.init_N.double() @ a.init_A.double()
    exact = w_orig - delta
    err = (layer.base.weight.double() - exact).abs()
    assert (err <= torch.finfo(dtype).eps / 2 * exact.abs() + 1e-6 * (w_orig.abs() + delta.abs()) + 1e-30).all()


def test_double_merge_and_spurious_unmerge_warn_and_do_nothing():
    layer = NLoRALinear(make_linear(), rank=4, init="nystrom")
    with pytest.warns(UserWarning, match="no adapter is merged"):
        layer.unmerge()
    layer.merge()
    w = layer.base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base.weight, w)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = nn.Sequential(make_linear())
    nlora.inject(model, ["0"], rank=4, init="slora")
    with torch.no_grad():
        model[0].lora_B.fill_(float("inf"))
    w = model[0].base.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        nlora.merge(model, safe=True)
    assert torch.equal(model[0].base.weight, w) and model[0].merged_adapters == ()


def test_merge_and_unload_gives_plain_linears_with_the_merged_weight():
    model = nn.Sequential(make_linear(out_f=12, in_f=12), nn.ReLU(), make_linear(out_f=5, in_f=12, seed=3))
    x = torch.randn(4, 12)
    nlora.inject(model, ["0", "2"], rank=3, init="nystrom")
    perturb(model[0])
    y = model(x)
    nlora.merge_and_unload(model)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    assert not any(isinstance(m, NLoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_adapter_dtype_and_compute_dtype():
    base = make_linear(dtype=torch.bfloat16)
    layer = NLoRALinear(base, rank=4, init="nystrom")
    assert layer.lora_A.dtype == torch.float32  # fp32 master factors by default
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    ref = NLoRALinear(make_linear(dtype=torch.bfloat16), rank=4, init="nystrom", compute_dtype=torch.float32)
    torch.testing.assert_close(ref(x).float(), y.float(), rtol=3e-2, atol=3e-2)
    half = NLoRALinear(make_linear(dtype=torch.bfloat16), rank=4, init="nystrom", adapter_dtype=torch.bfloat16)
    assert half.lora_N.dtype == torch.bfloat16


def test_autocast_forward_runs_in_low_precision():
    layer = NLoRALinear(make_linear(), rank=4, init="slora")
    perturb(layer)
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


def test_repr_names_shape_rank_init_and_mode():
    text = repr(NLoRALinear(make_linear(out_f=20, in_f=12), rank=4, init="nystrom", train="middle"))
    for part in ("in=12", "out=20", "rank=4", "init='nystrom'", "train='middle'"):
        assert part in text, text


def test_wrapping_a_non_linear_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Linear"):
        NLoRALinear(nn.Conv2d(3, 3, 1), rank=1)


def test_unmerge_warning_does_not_fire_on_normal_use():
    layer = NLoRALinear(make_linear(), rank=4, init="nystrom")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.merge()
        layer.unmerge()


@pytest.mark.parametrize("fresh", [True, False])
def test_a_fresh_initialisers_factors_become_the_parameters_without_a_copy(fresh, monkeypatch):
    """``register_init(..., fresh=True)`` lets the layer keep the returned tensors as parameters (no copy); views,
    tensors of another dtype and a second factor sharing the first's storage are still copied, and an init that does
    not promise freshness always gets copies (so it may keep or reuse what it returns)."""
    from nlora.inits import INITIALIZERS, Factors, register_init

    returned: dict[str, torch.Tensor] = {}

    def init_probe(weight, rank, *, scaling, generator=None):
        out_f, in_f = weight.shape
        big = torch.randn(2 * rank, in_f)
        returned.update(A=torch.randn(rank, in_f), N=big[:rank, :rank], B=torch.randn(out_f, rank).double())
        return Factors(returned["A"], returned["N"], returned["B"])

    monkeypatch.setitem(INITIALIZERS, "probe", None)
    register_init("probe", data_driven=False, has_middle=True, fresh=fresh)(init_probe)
    layer = NLoRALinear(make_linear(out_f=12, in_f=9), rank=3, init="probe")
    ad = layer.adapters["default"]
    assert (ad.lora_A.data_ptr() == returned["A"].data_ptr()) == fresh  # kept as it is only when promised fresh
    assert ad.lora_N.data_ptr() != returned["N"].data_ptr() and ad.lora_N._base is None  # a view: copied
    assert ad.lora_B.dtype == torch.float32 and torch.equal(ad.lora_B, returned["B"].float())  # fp64: converted
    assert all(p.is_contiguous() for p in (ad.lora_A, ad.lora_N, ad.lora_B))
    torch.testing.assert_close(ad.lora_N, returned["N"])


def test_fresh_factors_that_share_storage_are_copied_apart():
    from nlora.inits import Factors
    from nlora.layer import Adapter

    t = torch.randn(4, 4)
    ad = Adapter(Factors(t, t, torch.zeros(6, 4)), alpha=4.0, init="slora", train="all", dropout=0.0,
                 preserve_output=False, options={}, fresh=True)
    assert ad.lora_A.data_ptr() == t.data_ptr() and ad.lora_N.data_ptr() != t.data_ptr()
    with torch.no_grad():
        ad.lora_A.add_(1)
    assert not torch.equal(ad.lora_A, ad.lora_N)  # two parameters, two storages
