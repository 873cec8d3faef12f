"""NLoRALinear (nlora/layer.py): the forward and its gradients against float64 references (every init, dropout, N-D
inputs, HF Conv1D, several active adapters, inactive output-preserving adapters, the disabled layer), the one
in-place autograd node (graph shape, gradcheck, double backward refused), merge/unmerge, IntTune reading A and B
from the base weight, a trainable base, and the precision policy (fp32 masters, low-precision compute, fp32 grads)."""

from __future__ import annotations

import collections
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import nlora
from nlora import AdapterConfig, NLoRALinear
from nlora.layer import is_conv1d
from nlora.layer import build_adapter

from .model_zoo import MODELS, one_thread  # noqa: F401 (autouse fixture)

ALL_INITS = ["lora", "gaussian", "slora", "nystrom", "nystrom-pinv", "nystrom-optimal", "pissa"]
F64 = torch.float64


# -- helpers ------------------------------------------------------------------------------------------------------
def make_linear(out_f=20, in_f=12, bias=True, seed=0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def add_adapter(layer: NLoRALinear, name: str, seed: int = 0, **kwargs) -> None:
    """Put one more adapter on ``layer`` (kwargs: AdapterConfig fields and init options)."""
    config = AdapterConfig.build(**kwargs)
    layer.add(name, build_adapter(layer.base, config, name, torch.Generator().manual_seed(seed)))


def perturb(layer: NLoRALinear, seed: int = 1, std: float = 0.3) -> None:
    """Random values for every stored adapter factor, so that B = 0 inits have a non-zero delta too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def product64(a, n, b, scaling) -> torch.Tensor:
    a, b = a.double(), b.double()
    return scaling * b @ (a if n is None else n.double() @ a)


def reference(layer: NLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """float64 ``x (W + Σ_active s B N A + Σ_inactive preserving s B0 N0 A0)ᵀ + bias`` from the layer's state."""
    w = layer.weight.double()
    for name, ad in layer.adapters.items():
        if name in layer.active_adapters and name not in layer.merged_adapters:
            w = w + product64(*ad.factors(layer.weight), ad.scaling)
        elif name not in layer.active_adapters and ad.config.preserve_output:
            w = w + product64(ad.init_A, ad.init_N, ad.init_B, ad.scaling)
    bias = layer.base.bias
    return x.double() @ w.T + (0 if bias is None else bias.double())


def graph_nodes(t: torch.Tensor) -> collections.Counter:
    """Autograd nodes reachable from ``t`` by type, the leaves' AccumulateGrad left out."""
    seen, todo, count = set(), [t.grad_fn], collections.Counter()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            count[type(node).__name__] += 1
        todo.extend(nxt for nxt, _ in node.next_functions)
    return count


# -- forward against float64 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ALL_INITS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64_reference(init, bias):
    layer = NLoRALinear(make_linear(bias=bias), rank=5, alpha=10, init=init)
    perturb(layer)
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)
    assert layer.scaling == 2.0 and layer.adapters["default"].config.rank == 5


@pytest.mark.parametrize("shape", [(5, 12), (3, 7, 12), (2, 3, 4, 12), "non-contiguous"])
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_nd_inputs_outputs_and_gradients_of_x_a_n_b(shape, alpha):
    layer = NLoRALinear(make_linear(out_f=40, in_f=12), rank=6, alpha=alpha, init="slora")
    perturb(layer)
    if shape == "non-contiguous":
        x = torch.randn(6, 12, 5).transpose(1, 2).requires_grad_(True)  # (6, 5, 12), a strided view
    else:
        x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*x.shape[:-1], 40)
    g = torch.randn_like(y)
    y.backward(g)
    ad = layer.adapters["default"]
    got = [x.grad, ad.lora_A.grad, ad.lora_N.grad, ad.lora_B.grad]
    xd, a, n, b = (t.detach().double().requires_grad_(True) for t in (x, ad.lora_A, ad.lora_N, ad.lora_B))
    yd = xd @ layer.base.weight.double().T + layer.base.bias.double() + ad.scaling * ((xd @ a.T) @ n.T) @ b.T
    yd.backward(g.double())
    torch.testing.assert_close(y.double(), yd.detach(), rtol=1e-5, atol=1e-5)
    for name, mine, want in zip("xANB", got, [xd.grad, a.grad, n.grad, b.grad]):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.double(), want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("init", ["slora", "nystrom"])
def test_dropout_acts_on_the_adapter_input_only_in_training(init):
    layer = NLoRALinear(make_linear(), rank=4, init=init, dropout=0.4)
    perturb(layer)
    ad = layer.adapters["default"]
    x = torch.randn(2, 5, 12)
    torch.manual_seed(3)
    y = layer(x)  # a fresh module trains: dropout is live
    torch.manual_seed(3)
    dropped = F.dropout(x.reshape(-1, 12), 0.4, training=True).double()  # the same draw, on the same 2-D input
    want = (x.reshape(-1, 12).double() @ layer.base.weight.double().T + layer.base.bias.double()
            + dropped @ product64(*ad.factors(layer.weight), ad.scaling).T)
    torch.testing.assert_close(y.double(), want.view(2, 5, 20), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y.double(), reference(layer, x), rtol=1e-3, atol=1e-3)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


# -- gradcheck of the autograd node in float64 -------------------------------------------------------------------
def _f64_layer(init="slora", bias=True, **kwargs) -> NLoRALinear:
    torch.manual_seed(0)
    layer = NLoRALinear(nn.Linear(5, 4, bias=bias).double(), rank=2, alpha=1.4, init=init, adapter_dtype=F64, **kwargs)
    perturb(layer, std=0.7)
    return layer


@pytest.mark.parametrize("case", ["all", "middle", "middle-no-bias", "two-middle", "dropout", "two-adapters"])
def test_gradcheck_x_a_n_b_float64(case):
    """``torch.autograd.gradcheck`` through the layer, with the factors passed in as the parameters.

    middle: IntTune on the paper's init reads A and B from the base weight, so W is checked (A, B, base paths); its
    g B is read from the base's g W, and without a bias its x Aᵀ from the base output (two-middle: two such adapters
    of ranks 2 and 3 and a third with dropout, which reads its own x Aᵀ). dropout: the mask is re-drawn from the same
    seed at every call. two-adapters: the second one has dropout, the first reads x itself: their input gradients are
    summed inside the node."""
    if case.endswith("middle") or case == "middle-no-bias":
        layer = _f64_layer("nystrom", bias=case == "middle", train="middle")
        names = ["base.weight", "adapters.default.lora_N"]
        if case == "two-middle":
            add_adapter(layer, "other", rank=3, alpha=2.0, init="nystrom", train="middle", adapter_dtype=F64)
            add_adapter(layer, "third", rank=2, init="nystrom", train="middle", dropout=0.5, adapter_dtype=F64)
            layer.set_active(["default", "other", "third"])
            perturb(layer, std=0.7)
            names += ["adapters.other.lora_N", "adapters.third.lora_N"]
    else:
        layer = _f64_layer(dropout=0.3 if case == "dropout" else 0.0)
        names = [f"adapters.default.lora_{m}" for m in "ANB"]
        if case == "two-adapters":
            add_adapter(layer, "other", seed=1, rank=2, alpha=3.0, init="slora", dropout=0.5, adapter_dtype=F64)
            layer.set_active(["default", "other"])
            perturb(layer, std=0.7)
            names += [f"adapters.other.lora_{m}" for m in "ANB"]
    layer.train()
    params = dict(layer.named_parameters())

    def f(x, *tensors):
        torch.manual_seed(0)  # the same dropout masks at every call
        return functional_call(layer, dict(zip(names, tensors)), (x,))

    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    inputs = [x] + [params[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, inputs)


# -- the single in-place autograd node -------------------------------------------------------------------------
# the backward nodes of nlora's autograd Functions, by type name
NLORA_NODES = {f"{name}Backward" for name, obj in vars(nlora.layer).items()
               if isinstance(obj, type) and issubclass(obj, torch.autograd.Function)}


@pytest.mark.parametrize("kind", ["nlora", "inttune", "three-adapters"])
def test_each_adapted_layer_adds_at_most_one_autograd_node(kind):
    """All of a layer's active adapters run in ONE node of nlora's: against the frozen model, the graph gains at most
    one node per adapted layer and no node of any other kind (no per-adapter matmuls, adds or casts)."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 8)).requires_grad_(False)

    x = torch.randn(2, 3, 12, requires_grad=True)
    plain = graph_nodes(build()(x))
    model = build()
    if kind == "three-adapters":
        for i, (name, opts) in enumerate({"a": dict(init="slora"), "b": dict(init="nystrom", train="middle"),
                                          "c": dict(init="lora", alpha=5.0)}.items()):
            nlora.inject(model, "all-linear", rank=2, seed=i, adapter=name, **opts)
        nlora.set_adapter(model, ["a", "b", "c"])
    else:
        nlora.inject(model, "all-linear", rank=3, init="nystrom", train="middle" if kind == "inttune" else "all")
    y = model(x)
    adapted = graph_nodes(y)
    assert sum(n for k, n in adapted.items() if k in NLORA_NODES) == 2, adapted
    assert set(adapted - plain) <= NLORA_NODES and sum(adapted.values()) <= sum(plain.values()) + 2, (adapted, plain)
    out = model[0](x)  # the N-D output is a view of the node's 2-D output
    assert type(out.grad_fn.next_functions[0][0]).__name__ in NLORA_NODES
    y.sum().backward()  # and it runs


def test_strided_inputs_and_a_hook_with_a_strided_output_work_for_linear_and_conv1d():
    """The base gets 2-D rows (HF Conv1D views its input, which a transposed sequence-first tensor cannot give), and
    a forward hook may return a strided output."""
    from transformers.pytorch_utils import Conv1D

    x = torch.randn(5, 3, 8, dtype=F64).transpose(0, 1)  # (3, 5, 8), not contiguous
    for base in (nn.Linear(8, 6).double(), Conv1D(6, 8).double()):
        layer = NLoRALinear(base, rank=2, init="slora", seed=0, adapter_dtype=F64)
        perturb(layer, std=0.5)
        want = x.contiguous() @ (layer.weight + layer.delta_weight()).T + layer.base.bias
        torch.testing.assert_close(layer(x), want)
    hooked = nn.Linear(8, 6, bias=False).double()
    hooked.register_forward_hook(lambda m, i, o: o.T.contiguous().T)  # same values, column-major
    layer = NLoRALinear(hooked, rank=2, init="slora", seed=0, adapter_dtype=F64)
    perturb(layer, std=0.5)
    torch.testing.assert_close(layer(x), x.contiguous() @ (layer.weight + layer.delta_weight()).T)


def test_double_backward_is_refused():
    layer = _f64_layer()
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_of_a_3d_input_may_be_updated_in_place_by_user_code(dtype):
    layer = NLoRALinear(make_linear(dtype=dtype), rank=4, init="slora")
    perturb(layer)
    x = torch.randn(2, 3, 12, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.mul_(2)  # e.g. a residual update in place
    y.float().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    (2 * layer(ref)).float().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)


def test_inttune_keeps_no_layer_input_alive_for_backward():
    """The node saves only what each gradient needs: frozen A (IntTune) means x is not kept, only x A (tokens, r)."""
    layer = NLoRALinear(make_linear(out_f=40, in_f=24), rank=3, init="nystrom", train="middle")
    x = torch.randn(64, 24, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    assert (64, 24) not in shapes and (64, 3) in shapes, shapes


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # views (the base weight's transpose, IntTune's A and B) allocate nothing
            self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                            if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("init, train", [("slora", "all"), ("nystrom", "all"), ("nystrom", "middle"), ("lora", "all")])
def test_forward_and_backward_never_materialise_the_delta(init, train):
    layer = NLoRALinear(make_linear(out_f=33, in_f=17), rank=3, init=init, train=train)
    x = torch.randn(5, 17, requires_grad=True)
    with _ShapeRecorder() as rec:
        layer(x).sum().backward()
    assert (33, 17) not in rec.shapes and (17, 33) not in rec.shapes, rec.shapes


def test_no_grad_inference_mode_and_untouched_inputs():
    layer = NLoRALinear(make_linear(), rank=4, alpha=2.0, init="slora")
    perturb(layer)
    x = torch.randn(2, 3, 12)
    x0, w0 = x.clone(), layer.base.weight.detach().clone()
    ref = reference(layer, x)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = layer(x)
        assert y.grad_fn is None
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(layer.base.weight, w0)


# -- several adapters, inactive ones, the disabled layer ----------------------------------------------------------
def test_several_active_adapters_add_their_deltas_and_gradients():
    layer = NLoRALinear(make_linear(), rank=2, init="slora", adapter="a")
    add_adapter(layer, "b", seed=1, rank=3, init="nystrom", train="middle")
    add_adapter(layer, "c", seed=2, rank=2, init="lora", alpha=5.0)
    layer.set_active(["a", "b", "c"])
    perturb(layer)
    x = torch.randn(4, 3, 12, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y.double(), reference(layer, x.detach()), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.weight.detach().double()
    xd = x.detach().double().requires_grad_(True)
    leaves = {f"{k}.{n}": p.detach().double().requires_grad_(True) for k, ad in layer.adapters.items()
              for n, p in ad.named_parameters()}
    delta = (product64(leaves["a.lora_A"], leaves["a.lora_N"], leaves["a.lora_B"], 1.0)
             + product64(w[:3], leaves["b.lora_N"], w[:, :3], 1.0)  # IntTune on the paper's init: A, B are W's
             + product64(leaves["c.lora_A"], None, leaves["c.lora_B"], 2.5))
    yd = xd @ (w + delta).T + layer.base.bias.double()
    yd.backward(g.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    for key, leaf in leaves.items():
        adapter, name = key.split(".")
        torch.testing.assert_close(getattr(layer.adapters[adapter], name).grad.double(), leaf.grad, rtol=1e-5,
                                   atol=1e-5, msg=key)


def test_each_adapter_uses_its_own_middle_matrix():
    layer = NLoRALinear(make_linear(), rank=4, init="nystrom-optimal", adapter="a")
    add_adapter(layer, "ab", rank=2, init="pissa", train="middle")  # "a" is a prefix of "ab"
    layer.set_active(["a", "ab"])
    perturb(layer)
    x = torch.randn(3, 12)
    with torch.no_grad():
        y = layer(x)
        for name in ("a", "ab"):
            saved = layer.adapters[name].lora_N.clone()
            layer.adapters[name].lora_N.zero_()
            assert not torch.allclose(layer(x), y)
            layer.adapters[name].lora_N.copy_(saved)
        assert torch.equal(layer(x), y)


def test_each_adapter_module_is_called_in_forward_so_its_hooks_run():
    """FSDP2 and other wrappers act through module hooks: every active adapter (and every inactive one that gives
    its initial delta back) is called as a module once per forward."""
    layer = NLoRALinear(make_linear(), rank=2, init="slora", adapter="a")
    add_adapter(layer, "b", rank=2, init="pissa")
    add_adapter(layer, "c", rank=2, init="lora")
    layer.set_active(["a", "c"])
    calls = []
    for name, ad in layer.adapters.items():
        ad.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    layer(torch.randn(3, 12))
    assert sorted(calls) == ["a", "b", "c"]


def test_inactive_output_preserving_adapters_give_their_initial_delta_back():
    """Each adapter computes relative to the original weight: the base holds W0 - Δ1(0) - Δ2(0), and an inactive
    preserving adapter adds its initial delta back in forward."""
    base = make_linear()
    x = torch.randn(6, 12)
    y0 = base(x).detach()
    layer = NLoRALinear(base, rank=4, init="pissa", adapter="first")
    add_adapter(layer, "second", rank=2, init="nystrom", preserve_output=True, index="norm")
    layer.set_active(["second"])
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    layer.set_active(["first"])
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    perturb(layer, std=0.1)
    first = layer.adapters["first"]
    want = y0.double() + x.double() @ (product64(first.lora_A, first.lora_N, first.lora_B, 1.0)
                                       - product64(first.init_A, first.init_N, first.init_B, 1.0)).T
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init, options", [("nystrom", {}), ("nystrom", {"preserve_output": True}), ("pissa", {}),
                                           ("lora", {}), ("nystrom", {"train": "middle"})])
@pytest.mark.parametrize("merged", [False, True])
def test_disabled_layer_gives_the_original_output(init, options, merged):
    base = make_linear()
    x = torch.randn(6, 12)
    y0 = base(x).detach()
    layer = NLoRALinear(base, rank=4, init=init, dropout=0.3, **options)
    add_adapter(layer, "second", rank=2, init="pissa")  # inactive, and it moved the base weight
    layer.set_active(["default"])
    perturb(layer)
    if merged:
        layer.merge()
    layer.train()  # live dropout must not leak into the disabled output
    layer.disabled = True
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    layer.disabled = False
    assert not torch.allclose(layer(x), y0, rtol=1e-3, atol=1e-3)


def test_preserve_output_add_subtracts_and_remove_gives_back_the_initial_delta():
    base = make_linear(out_f=24, in_f=16)
    w0 = base.weight.detach().clone()
    x = torch.randn(6, 16)
    y0 = base(x).detach()
    layer = NLoRALinear(base, rank=6, init="nystrom", preserve_output=True, index="random",
                        generator=torch.Generator().manual_seed(0))
    ad = layer.adapters["default"]
    torch.testing.assert_close(layer.weight.double(), w0.double() - product64(ad.init_A, ad.init_N, ad.init_B, 1.0),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    add_adapter(layer, "lora", init="lora")
    layer.remove("default")
    assert list(layer.adapters) == ["lora"] and layer.active_adapters == ()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def test_faithful_nystrom_leaves_the_weight_and_moves_the_output_by_its_delta():
    base = make_linear(out_f=24, in_f=16)
    w0 = base.weight.detach().clone()
    x = torch.randn(6, 16)
    y0 = base(x).detach()
    layer = NLoRALinear(base, rank=4, init="nystrom")
    assert torch.equal(layer.base.weight, w0)  # as in the paper's code
    torch.testing.assert_close(layer(x) - y0, x @ (w0[:, :4] @ w0[:4, :4] @ w0[:4, :]).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["lora", "gaussian", "slora"])
def test_zero_b_inits_leave_outputs_bit_identical(init):
    base = make_linear()
    x = torch.randn(6, 12)
    assert torch.equal(NLoRALinear(base, rank=4, init=init)(x), base(x))


# -- merge / unmerge ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ALL_INITS)
def test_merge_equals_unmerged_and_unmerge_restores(init):
    layer = NLoRALinear(make_linear(), rank=4, init=init)
    perturb(layer)
    x = torch.randn(5, 12)
    y = layer(x)
    w_before = layer.base.weight.detach().clone()
    layer.merge()
    assert layer.merged_adapters == ("default",)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w_before, rtol=0, atol=1e-6)  # fp32: one rounding each way
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_merge_rounds_an_fp32_delta_once_into_bf16():
    layer = NLoRALinear(make_linear(dtype=torch.bfloat16), rank=4, init="slora")
    perturb(layer)
    w0 = layer.base.weight.detach().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    layer.merge()
    assert torch.equal(layer.base.weight, (w0.float() + delta).to(torch.bfloat16))
    layer.unmerge()
    # bf16 keeps 8 bits of mantissa: the round trip is within 2 ulps of the larger of |W| and |delta|
    assert ((layer.base.weight.float() - w0.float()).abs() <= (w0.float().abs() + delta.abs()) * 2 ** -7).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", ["nystrom-pinv", "nystrom-optimal", "pissa"])
def test_a_low_precision_residual_is_the_difference_rounded_once(dtype, init):
    base = make_linear(out_f=24, in_f=16, dtype=dtype)
    w_orig = base.weight.detach().double().clone()
    layer = NLoRALinear(base, rank=5, init=init)
    delta = layer.delta_weight(initial=True).double()
    exact = w_orig - delta
    err = (layer.base.weight.double() - exact).abs()
    assert (err <= torch.finfo(dtype).eps / 2 * exact.abs() + 1e-6 * (w_orig.abs() + delta.abs()) + 1e-30).all()


def test_merging_two_adapters_in_sequence_equals_merging_their_sum_float64():
    torch.manual_seed(0)
    w0 = torch.randn(10, 7, dtype=F64)
    layers = []
    for _ in range(2):
        base = nn.Linear(7, 10, bias=False).double()
        base.weight.data.copy_(w0)
        layer = NLoRALinear(base, rank=3, alpha=6, init="slora", adapter="a", adapter_dtype=F64,
                            generator=torch.Generator().manual_seed(1))
        add_adapter(layer, "ab", seed=2, rank=3, alpha=6, init="nystrom", adapter_dtype=F64)
        perturb(layer)
        layers.append(layer)
    seq, both = layers
    seq.set_active(["a"])
    seq.merge()
    seq.set_active(["a", "ab"])  # "a" stays merged, "ab" goes on top
    seq.merge()
    both.set_active(["a", "ab"])
    both.merge()
    assert seq.merged_adapters == both.merged_adapters == ("a", "ab")
    total = seq.delta_weight("a").double() + seq.delta_weight("ab").double()
    torch.testing.assert_close(seq.weight, w0 + total, rtol=0, atol=1e-12)
    torch.testing.assert_close(seq.weight, both.weight, rtol=0, atol=1e-12)
    seq.unmerge()
    torch.testing.assert_close(seq.weight, w0, rtol=0, atol=1e-12)


def test_layer_merge_and_unmerge_warn_when_there_is_nothing_to_do():
    layer = NLoRALinear(make_linear(), rank=4, init="nystrom")
    with pytest.warns(UserWarning, match="no adapter is merged"):
        layer.unmerge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normal use is silent
        layer.merge()
        layer.unmerge()
        layer.merge()
    w = layer.base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base.weight, w)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    layer = NLoRALinear(make_linear(), rank=4, init="slora")
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    w = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe=True)
    assert torch.equal(layer.base.weight, w) and layer.merged_adapters == ()


# -- IntTune ----------------------------------------------------------------------------------------------------
def test_inttune_on_the_papers_init_stores_only_n_and_reads_a_b_as_views_of_w():
    layer = NLoRALinear(make_linear(), rank=4, init="nystrom", train="middle")
    ad = layer.adapters["default"]
    w = layer.base.weight
    assert ad.lora_A is None and ad.lora_B is None and ad.reads_base and ad.config.reads_base
    assert [n for n, _ in layer.named_parameters()] == ["base.weight", "base.bias", "adapters.default.lora_N"]
    assert [k for k in layer.state_dict() if ".adapters." in k or k.startswith("adapters")] == \
        ["adapters.default.lora_N"]
    a, n, b = ad.factors(w)
    for view, want in ((a, w[:4]), (b, w[:, :4]), (layer.lora_A, w[:4]), (layer.lora_B, w[:, :4])):
        assert view._base is w and view.data_ptr() == want.data_ptr() and torch.equal(view, want)  # no copy
    assert n is ad.lora_N
    rand = NLoRALinear(make_linear(), rank=4, init="nystrom", train="middle", index="random",
                       generator=torch.Generator().manual_seed(0))
    ra = rand.adapters["default"]
    assert torch.equal(rand.lora_A, rand.weight[ra.rows]) and torch.equal(rand.lora_B, rand.weight[:, ra.cols])


def test_an_inttune_adapter_keeps_a_copy_of_a_and_b_once_the_base_weight_is_written():
    layer = NLoRALinear(make_linear(), rank=4, init="nystrom", train="middle")
    perturb(layer)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 12)
    y = layer(x)
    layer.merge()  # writes W: A and B are W0's slices, copied before the write
    ad = layer.adapters["default"]
    assert not ad.reads_base and torch.equal(ad.lora_A, w0[:4]) and torch.equal(ad.lora_B, w0[:, :4])
    assert not ad.lora_A.requires_grad and not ad.lora_B.requires_grad and ad.lora_A.data_ptr() != w0.data_ptr()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init, options", [("nystrom", {}), ("nystrom", {"preserve_output": True}),
                                           ("nystrom-optimal", {}), ("pissa", {})])
def test_inttune_trains_only_the_middle_matrix(init, options):
    layer = NLoRALinear(make_linear(), rank=4, init=init, train="middle", **options)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.default.lora_N"]
    a0, b0, n0, w0 = (t.detach().clone() for t in (layer.lora_A, layer.lora_B, layer.lora_N, layer.base.weight))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)  # all params offered on purpose
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 12)).square().mean().backward()
        opt.step()
    assert torch.equal(layer.lora_A, a0) and torch.equal(layer.lora_B, b0) and torch.equal(layer.base.weight, w0)
    assert not torch.equal(layer.lora_N, n0)


# -- a base the user made trainable ---------------------------------------------------------------------------
@pytest.mark.parametrize("train", ["all", "middle"])
def test_a_base_weight_or_bias_set_to_require_grad_gets_its_gradient(train):
    """The base runs in its own autograd node, so unfreezing its weight or bias works; under IntTune the adapter's
    A and B are views of that weight, so its gradient also has their terms (the float64 reference spells them out)."""
    layer = NLoRALinear(make_linear(), rank=3, alpha=6, init="nystrom", train=train)
    perturb(layer, std=0.1)
    layer.base.requires_grad_(True)
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 20)
    layer(x).backward(g)
    ad = layer.adapters["default"]
    w, bias, xd = (t.detach().double().requires_grad_(True) for t in (layer.base.weight, layer.base.bias, x))
    n = ad.lora_N.detach().double().requires_grad_(True)
    a, b = (w[:3], w[:, :3]) if train == "middle" else (ad.lora_A.detach().double(), ad.lora_B.detach().double())
    (xd @ w.T + bias + 2.0 * ((xd @ a.T) @ n.T) @ b.T).backward(g.double())
    for got, want in ((layer.base.weight.grad, w.grad), (layer.base.bias.grad, bias.grad), (x.grad, xd.grad),
                      (ad.lora_N.grad, n.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.xfail(strict=True, reason="documented limit (NLoRALinear's docstring, docs/design.md): the adapters' "
                   "node runs base(x) and takes g W as its input gradient, so a forward hook on the wrapped layer that "
                   "changes its output is applied in forward but not differentiated; hook the NLoRALinear instead")
def test_a_forward_hook_that_changes_the_base_output_is_differentiated():
    base = make_linear(out_f=4, in_f=6)
    layer = NLoRALinear(base, rank=2, init="slora")
    perturb(layer)
    base.register_forward_hook(lambda module, inputs, out: out * 2)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).sum().backward()
    ad = layer.adapters["default"]
    xr = x.detach().clone().requires_grad_(True)
    (2 * F.linear(xr, base.weight, base.bias) + xr @ product64(*ad.factors(layer.weight), ad.scaling).T.float()
     ).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


# -- HF Conv1D --------------------------------------------------------------------------------------------------
def test_conv1d_forward_merge_and_nystrom_slices_use_the_out_in_layout():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    base = conv1d(40, 12)  # weight stored (in=12, out=40)
    w = base.weight.detach().double().T.clone()  # (out, in), the layout the paper's slices are taken in
    layer = NLoRALinear(base, rank=4, alpha=8, init="nystrom")
    assert (layer.in_features, layer.out_features) == (12, 40) and is_conv1d(layer.base)
    torch.testing.assert_close(layer.lora_A.double(), w[:4, :], rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_B.double(), w[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_N.double(), w[:4, :4], rtol=0, atol=0)
    assert all(p.is_contiguous() for p in layer.adapters.parameters())
    perturb(layer, std=0.1)
    x = torch.randn(2, 5, 12)
    expected = x.double() @ (w + layer.delta_weight().double()).T + layer.base.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.base.weight.double(), (w + layer.delta_weight().double()).T, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_is_detected_by_duck_typing_without_transformers():
    class Conv1D(nn.Module):  # not transformers' class: the same name and layout
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)

    class NotConv(nn.Module):  # an (in, out) weight without nf is not mistaken for Conv1D
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

    layer = NLoRALinear(Conv1D(12, 7), rank=3, init="pissa")
    assert layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (12, 3)
    assert not is_conv1d(NotConv())
    with pytest.raises(TypeError, match="NLoRALinear wraps nn.Linear or HF Conv1D"):
        NLoRALinear(NotConv(), rank=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        NLoRALinear(nn.Conv2d(3, 3, 1), rank=1)


# -- precision policy: fp32 masters, low-precision compute, fp32 gradients -------------------------------------------
def _max_err(got, want) -> float:
    return float((got.detach().double() - want).abs().max())


@pytest.mark.parametrize("train", ["all", "middle"])
def test_bf16_base_fp32_masters_bf16_compute_fp32_grads(train):
    """bf16 activations, fp32 master factors: bf16 output, fp32 parameter gradients, and no worse against float64
    than plain bf16 autograd of the same formula (the in-place GEMM skips roundings)."""
    torch.manual_seed(0)
    layer = NLoRALinear(nn.Linear(24, 40).bfloat16(), rank=6, init="nystrom", train=train)
    perturb(layer, std=0.1)
    ad = layer.adapters["default"]
    x = torch.randn(64, 24).bfloat16().requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in ad.parameters())
    gy = torch.randn_like(y)
    y.backward(gy)
    trained = ad.trainable_parameters()
    assert trained and all(p.grad.dtype == torch.float32 for p in trained) and x.grad.dtype == torch.bfloat16

    def run(dtype):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, *ad.factors(layer.weight))]
        xl, a, n, b = leaves
        w, bias = layer.base.weight.to(dtype), layer.base.bias.to(dtype)
        out = F.linear(xl.to(dtype), w, bias) + ad.scaling * (((xl.to(dtype) @ a.to(dtype).T) @ n.to(dtype).T)
                                                              @ b.to(dtype).T)
        out.backward(gy.to(dtype))
        return out.detach(), [t.grad for t in leaves]

    plain, plain_g = run(torch.bfloat16)
    ref, ref_g = run(F64)
    mine_g = [x.grad] + [None if p is None else p.grad for p in (ad.lora_A, ad.lora_N, ad.lora_B)]
    assert _max_err(y, ref) <= 1.5 * _max_err(plain, ref) + 1e-3 * float(ref.abs().max())
    for mine, pl, rf in zip(mine_g, plain_g, ref_g):
        if mine is not None:
            assert _max_err(mine, rf.double()) <= 1.5 * _max_err(pl, rf.double()) + 1e-3 * float(rf.abs().max())


def test_compute_dtype_runs_the_adapter_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    layer = NLoRALinear(nn.Linear(12, 20).bfloat16(), rank=4, init="slora", compute_dtype=torch.float32)
    perturb(layer)
    ad = layer.adapters["default"]
    x = torch.randn(3, 12).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    want = (layer.base(x).float() + ad.scaling * (x.float() @ ad.lora_A.T @ ad.lora_N.T @ ad.lora_B.T))
    assert ((y.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()  # half a bf16 ulp, plus fp32 rounding
    half = NLoRALinear(nn.Linear(12, 20).bfloat16(), rank=4, init="nystrom", adapter_dtype=torch.bfloat16)
    assert half.lora_N.dtype == torch.bfloat16 and half(x).dtype == torch.bfloat16


def test_autocast_bf16_compute_fp32_masters_and_grads():
    layer = NLoRALinear(make_linear(), rank=4, init="slora")
    perturb(layer)
    x = torch.randn(4, 3, 12)
    layer(x).square().mean().backward()
    ref_y, ref_g = layer(x).detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    torch.testing.assert_close(y.float(), ref_y, rtol=5e-2, atol=5e-2)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.dtype == p.grad.dtype == torch.float32, n
            torch.testing.assert_close(p.grad, ref_g[n], rtol=0.1, atol=0.05 * float(ref_g[n].abs().max()), msg=n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_llama_keeps_fp32_adapters_and_its_fp32_loss(dtype):
    spec = MODELS["llama"]
    x = spec.inputs(torch.Generator().manual_seed(3))["input_ids"]
    losses = {}
    for dt in (torch.float32, dtype):
        model = spec.model().to(dt)
        nlora.inject(model, "all-linear", rank=4, init="nystrom", seed=0)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.base.weight.dtype == dt
        assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {torch.float32}
        assert torch.equal(layer.lora_A, layer.base.weight[:4].float())  # exact slices of the low-precision weight
        out = model(input_ids=x, labels=x)
        assert out.logits.dtype == dt
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        losses[dt] = out.loss.float()
    torch.testing.assert_close(losses[dtype], losses[torch.float32], rtol=2e-2, atol=0)


# -- layout and repr ------------------------------------------------------------------------------------------
def test_parameter_layout_and_alpha_default():
    layer = NLoRALinear(make_linear(out_f=20, in_f=12), rank=4, init="slora")
    assert layer.lora_A.shape == (4, 12) and layer.lora_N.shape == (4, 4) and layer.lora_B.shape == (20, 4)
    assert all(isinstance(p, nn.Parameter) for p in (layer.lora_A, layer.lora_N, layer.lora_B))
    assert layer.scaling == 1.0  # alpha defaults to r, as in the paper
    assert NLoRALinear(make_linear(), rank=4, init="lora").lora_N is None
    assert not layer.base.weight.requires_grad
    layer.set_active([])
    with pytest.raises(RuntimeError, match="0 adapters are active"):
        layer.lora_A


def test_repr_names_kind_shape_rank_init_and_mode():
    text = repr(NLoRALinear(make_linear(out_f=20, in_f=12), rank=4, init="nystrom", train="middle"))
    for part in ("Linear in=12, out=20, active=['default'], merged=[]", "rank=4", "init='nystrom'", "train='middle'"):
        assert part in text, text
    assert math.isclose(NLoRALinear(make_linear(), rank=4, alpha=2, init="lora").scaling, 0.5)
