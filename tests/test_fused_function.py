"""The one-node adapter branch (``nlora.layer._AdapterBranch``): outputs and every gradient equal plain autograd
(float64 and bf16, all train modes and trainable subsets, several adapters, LoRA without N, 3-D inputs, autocast,
dropout), gradcheck and double backward, and the frozen-factor cast cache never served stale."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import nlora
from nlora import layer as layer_mod
from nlora.layer import NLoRALinear, _AdapterBranch


@contextlib.contextmanager
def function_path(on: bool):
    saved = layer_mod.FUSED_FUNCTION
    layer_mod.FUSED_FUNCTION = on
    try:
        yield
    finally:
        layer_mod.FUSED_FUNCTION = saved


def _plain(y0, x, a, n, b, s, dtype):
    """The reference: ordinary autograd ops, out of place."""
    h = x.to(dtype) @ a.to(dtype).T
    h = h if n is None else h @ n.to(dtype).T
    return y0 + s * (h @ b.to(dtype).T)


def _branch_inputs(tokens, d_in, d_out, r, middle, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    x = torch.randn(tokens, d_in, generator=g, dtype=dtype)
    a = torch.randn(r, d_in, generator=g, dtype=dtype)
    n = torch.randn(r, r, generator=g, dtype=dtype) if middle else None
    b = torch.randn(d_out, r, generator=g, dtype=dtype)
    return w, x, a, n, b


def _run(fn, w, x, a, n, b, s, needs, dtype):
    """Output and gradients (x, A, N, B) of ``fn`` for the inputs flagged in ``needs``."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(need) for t, need in zip((x, a, n, b), needs)]
    lx, la, ln, lb = leaves
    y0 = lx.to(dtype) @ w.to(dtype).T  # a fresh base output, as NLoRALinear gives the branch
    y = fn(y0, lx, la, ln, lb, s, dtype)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    if y.requires_grad:
        y.backward(gy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _function(y0, x, a, n, b, s, dtype):
    return _AdapterBranch.apply(y0, x, a, n, b, None, None, s, (None, None, None))


@given(tokens=st.integers(1, 6), d_in=st.integers(1, 9), d_out=st.integers(1, 9), data=st.data(),
       middle=st.booleans(), s=st.sampled_from([1.0, 0.5, 3.0]), seed=st.integers(0, 2**16))
def test_branch_equals_plain_autograd_float64(tokens, d_in, d_out, data, middle, s, seed):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    needs = data.draw(st.tuples(*[st.booleans()] * 4))  # x, A, N, B: every trainable subset incl. IntTune
    inputs = _branch_inputs(tokens, d_in, d_out, r, middle, torch.float64, seed)
    w, rest = inputs[0], inputs[1:]
    got, got_g = _run(_function, w, *rest, s, needs, torch.float64)
    want, want_g = _run(_plain, w, *rest, s, needs, torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, gg, wg, need, t in zip("xANB", got_g, want_g, needs, rest):
        if t is None or not need:
            assert gg is None, name  # only the needed gradients are computed
        else:
            assert gg.dtype == t.dtype
            torch.testing.assert_close(gg, wg, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("middle", [True, False])
@pytest.mark.parametrize("s", [1.0, 2.5])
def test_branch_bf16_compute_fp32_masters(middle, s):
    """bf16 activations, fp32 masters: same values as plain autograd in bf16, gradients in fp32."""
    w, x, a, n, b = _branch_inputs(64, 24, 40, 6, middle, torch.float32, 1)
    x, w = x.bfloat16(), w.bfloat16()
    needs = (True, True, True, True)
    got, got_g = _run(_function, w, x, a, n, b, s, needs, torch.bfloat16)
    want, want_g = _run(_plain, w, x, a, n, b, s, needs, torch.bfloat16)
    ref, ref_g = _run(_plain, w.double(), x.double(), a.double(), None if n is None else n.double(), b.double(), s,
                      needs, torch.float64)
    assert got.dtype == torch.bfloat16 and got_g[0].dtype == torch.bfloat16
    # no worse than plain bf16 autograd against float64 (the in-place GEMM and the fp32 gradients skip roundings)
    for gg, wg, rg, t in zip([got, *got_g], [want, *want_g], [ref, *ref_g], (x, x, a, n, b)):
        if t is None:
            continue
        assert gg.dtype == (t.dtype if gg is not got else torch.bfloat16)
        assert (gg.double() - rg).abs().max() <= 1.5 * (wg.double() - rg).abs().max() + 1e-3 * rg.abs().max()


def test_gradcheck_and_double_backward_float64():
    w, x, a, n, b = _branch_inputs(5, 4, 3, 2, True, torch.float64, 3)
    w.requires_grad_(True)  # a trainable base too: the gradient to y must pass through untouched

    def f(w, x, a, n, b):
        return _AdapterBranch.apply(x @ w.T, x, a, n, b, None, None, 0.7, (None, None, None))

    inputs = [t.clone().requires_grad_(True) for t in (w, x, a, n, b)]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradcheck_with_the_base_folded_in_float64():
    """With ``y=None`` and ``w, bias`` the node also runs the frozen base and carries its input gradient."""
    w, x, a, n, b = _branch_inputs(5, 4, 3, 2, True, torch.float64, 4)
    bias = torch.randn(3, dtype=torch.float64)

    def f(x, a, n, b):  # the node runs the base itself: y = x W^T + bias
        return _AdapterBranch.apply(None, x, a, n, b, w, bias, 1.3, (None, None, None))

    inputs = [t.clone().requires_grad_(True) for t in (x, a, n, b)]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    xd = inputs[0].detach().requires_grad_(True)
    f(xd, a, n, b).sum().backward()  # only x needs a gradient: IntTune-like frozen factors, base included
    want = torch.ones(5, 3, dtype=torch.float64) @ (w + 1.3 * b @ n @ a)
    torch.testing.assert_close(xd.grad, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f(xd, a, n, b), _plain(xd @ w.T + bias, xd, a, n, b, 1.3, torch.float64))


def _saved_bytes(model, x, on):
    """Bytes of distinct tensors autograd keeps for backward (parameters and base weights excluded: always alive)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    xg = x.clone().requires_grad_(True)
    with function_path(on), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(xg)
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["nlora", "inttune", "three", "lora-alpha"])
def test_branch_keeps_no_more_for_backward_than_plain_autograd(kind):
    """Memory: the node saves what op-by-op autograd saves or less (IntTune keeps no layer input alive)."""
    model = _setup(torch.bfloat16, ADAPTER_SETS[kind], 2)
    x = torch.randn(4, 64, 12, dtype=torch.bfloat16)
    assert _saved_bytes(model, x, True) <= _saved_bytes(model, x, False)


def test_double_backward_through_frozen_a_is_refused_clearly():
    model = _setup(torch.float64, ADAPTER_SETS["inttune"], 0)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="FUSED_FUNCTION = False"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with function_path(False):  # the documented way out
        (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
    assert model[0].adapters["default"].lora_N.grad is not None


# -- through NLoRALinear / inject: the Function path against the op-by-op path of e638000 ----------------------
def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 8)).to(dtype)


def _setup(dtype, adapters, seed):
    """A model with the given adapters (name -> inject options), non-zero B, all of them active."""
    model = _model(dtype, seed)
    for i, (name, opts) in enumerate(adapters.items()):
        nlora.inject(model, ["0", "2"], seed=seed + i, adapter=name, **opts)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    nlora.set_adapter(model, list(adapters))
    return model


def _step(model, x, on, autocast=False):
    """Output and every gradient (input, adapter params) of one backward, with the Function path on or off."""
    model.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with function_path(on), ctx:
        torch.manual_seed(11)  # the same dropout masks for both paths
        y = model(xg)
    y.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), xg.grad, grads


ADAPTER_SETS = {
    "nlora": {"default": dict(rank=3, init="nystrom")},
    "inttune": {"default": dict(rank=3, init="nystrom", train="middle")},
    "lora-alpha": {"default": dict(rank=4, init="lora", alpha=2.0)},
    "preserve": {"default": dict(rank=3, init="nystrom-pinv", preserve_output=True)},
    "three": {"a": dict(rank=2, init="slora"), "b": dict(rank=3, init="nystrom", train="middle"),
              "c": dict(rank=2, init="lora", alpha=5.0)},
    "dropout": {"default": dict(rank=3, init="slora", dropout=0.3)},
}


@given(kind=st.sampled_from(sorted(ADAPTER_SETS)), shape=st.sampled_from([(5,), (2, 3), (2, 2, 2)]),
       seed=st.integers(0, 1000))
def test_layer_function_path_equals_op_by_op_float64(kind, shape, seed):
    model = _setup(torch.float64, ADAPTER_SETS[kind], seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    x = torch.randn(*shape, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y1, gx1, g1 = _step(model, x, True)
    y0, gx0, g0 = _step(model, x, False)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    assert g1.keys() == g0.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-12, atol=1e-12, msg=n)
    for n, p in model.named_parameters():  # the base is untouched and gets no gradient
        if ".base." in n:
            assert p.grad is None and torch.equal(p, base[n])


def test_base_is_folded_into_the_branch_only_where_it_may_be():
    """A plain frozen nn.Linear base gets no autograd node of its own; hooks on it or a trainable bias keep it."""
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    model = _setup(torch.float64, ADAPTER_SETS["nlora"], 1)
    xg = x.clone().requires_grad_(True)
    y = model[0](xg)
    node = y.grad_fn  # the 3-D input is flattened inside the node: no reshape/view nodes around it
    assert type(node).__name__ == "_AdapterBranchBackward" and y.shape == (2, 3, 20)
    inputs = {type(f).__name__ for f, _ in node.next_functions if f is not None}
    assert not any("Addmm" in k or "Mm" in k or "View" in k for k in inputs)  # the branch ran the base
    assert "AccumulateGrad" in inputs  # x's gradient goes straight to the leaf
    with function_path(False):
        assert not model[0]._folds_base(xg.reshape(-1, 12), model[0].adapters["default"])
    for change in ("hook", "bias"):
        model = _setup(torch.float64, ADAPTER_SETS["nlora"], 1)
        if change == "hook":  # a hook that changes the output must stay differentiated
            model[0].base.register_forward_hook(lambda mod, inp, out: out * 2)
        else:
            model[0].base.bias.requires_grad_(True)
        assert not model[0]._folds_base(xg.reshape(-1, 12), model[0].adapters["default"])
        y1, gx1, g1 = _step(model, x, True)
        y0, gx0, g0 = _step(model, x, False)
        torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
        assert g1.keys() == g0.keys()
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-12, atol=1e-12, msg=k)
        if change == "bias":
            assert "0.base.bias" in g1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_output_of_a_3d_input_is_a_fresh_tensor_user_code_may_update_in_place(dtype):
    """The folded node returns its own tensor, not a view (N-D ``F.linear`` returns one, and a view made inside a
    custom Function cannot be modified in place): three adapters chain in place on it, and so can user code."""
    model = _setup(dtype, ADAPTER_SETS["three"], 2)
    x = torch.randn(2, 3, 12, dtype=dtype, requires_grad=True)
    y = model[0](x)
    assert not y._is_view() and type(y.grad_fn).__name__ == "_AdapterBranchBackward"  # no fallback add
    y.mul_(2)  # e.g. a residual update in place
    y.float().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    with function_path(False):
        (model[0](ref) * 2).float().sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, ref.grad, **tol)


@pytest.mark.parametrize("kind", ["nlora", "inttune", "three"])
@pytest.mark.parametrize("autocast", [False, True])
def test_layer_bf16_fp32_masters_and_autocast(kind, autocast):
    """bf16 compute (a bf16 model, or an fp32 model under CPU autocast) with fp32 masters: fp32 gradients, the same
    values as the op-by-op path up to bf16 rounding."""
    model = _setup(torch.float32 if autocast else torch.bfloat16, ADAPTER_SETS[kind], 3)
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(0))
    x = x if autocast else x.bfloat16()
    y1, gx1, g1 = _step(model, x, True, autocast)
    y0, gx0, g0 = _step(model, x, False, autocast)
    assert y1.dtype == y0.dtype == torch.bfloat16 and gx1.dtype == x.dtype
    torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx1, gx0, rtol=2e-2, atol=2e-3)
    assert g1.keys() == g0.keys() and g1
    for n in g0:
        assert g1[n].dtype == torch.float32, n
        torch.testing.assert_close(g1[n], g0[n], rtol=3e-2, atol=3e-2 * g0[n].abs().max().item(), msg=n)


# -- the frozen-factor cast cache --------------------------------------------------------------------------------
def _inttune_layer():
    torch.manual_seed(0)
    return NLoRALinear(nn.Linear(12, 20).bfloat16(), rank=4, init="nystrom", train="middle")


def _op_by_op(layer, x):
    with function_path(False):
        return layer(x)


def test_frozen_factors_are_cast_once_and_reused():
    layer = _inttune_layer()
    adapter = layer.adapters["default"]
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    layer(x)
    first = adapter._cached_casts(torch.bfloat16, trainable=False)
    assert first[0].dtype == torch.bfloat16 and first[1] is None and first[2] is not None  # A, B cached; N trains
    layer(x).float().sum().backward()
    again = adapter._cached_casts(torch.bfloat16, trainable=False)
    assert again[0] is first[0] and again[2] is first[2]  # reused, no new cast
    assert adapter.lora_A.grad is None and adapter.lora_B.grad is None and adapter.lora_N.grad is not None
    assert not any("cast" in k for k in layer.state_dict())


@pytest.mark.parametrize("edit", ["inplace", "load_state_dict", "optimizer", "to_double_and_back", "copy_other"])
def test_cache_is_never_served_stale(edit):
    layer = _inttune_layer()
    adapter = layer.adapters["default"]
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    layer(x)  # fills the cache
    with torch.no_grad():
        if edit == "inplace":
            adapter.lora_A.mul_(2)
            adapter.lora_B.add_(1)
        elif edit == "load_state_dict":
            sd = {k: v * 3 if "lora_" in k else v for k, v in layer.state_dict().items()}
            layer.load_state_dict(sd)
        elif edit == "optimizer":  # someone unfreezes B, trains it a step, freezes it again
            adapter.lora_B.requires_grad_(True)
            opt = torch.optim.SGD([adapter.lora_B], lr=10.0)
            with torch.enable_grad():
                layer(x).float().sum().backward()
            opt.step()
            adapter.lora_B.requires_grad_(False)
        elif edit == "to_double_and_back":
            adapter.double()
            adapter.lora_A.mul_(-1)
            adapter.float()
        elif edit == "copy_other":
            adapter.lora_A.copy_(torch.randn_like(adapter.lora_A))
    torch.testing.assert_close(layer(x), _op_by_op(layer, x), rtol=0, atol=0)
    a_cast = adapter._cached_casts(torch.bfloat16, trainable=False)[0]
    assert torch.equal(a_cast, adapter.lora_A.bfloat16())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_runs_no_autograd_node_and_casts_each_factor_once(mode, monkeypatch):
    """Without autograd the branch runs as plain ops (no ``_AdapterBranch`` node) with every factor's bf16 copy
    cached, so decoding casts nothing after the first call; the output equals the op-by-op path bit for bit, an
    optimizer step is seen at once, and copies made under inference_mode are ordinary tensors that a later
    training step can use."""
    torch.manual_seed(0)
    layer = NLoRALinear(nn.Linear(12, 20).bfloat16(), rank=4, init="nystrom")  # train all: A, N, B trainable
    adapter = layer.adapters["default"]
    x = torch.randn(6, 12, dtype=torch.bfloat16)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    calls = []
    monkeypatch.setattr(_AdapterBranch, "apply", lambda *a: calls.append(1) or pytest.fail("autograd node"))
    with ctx():
        y = layer(x)
        first = adapter._cached_casts(torch.bfloat16, trainable=True)
        again = layer(x)
    assert not calls and y.grad_fn is None and torch.equal(y, again)
    assert all(c is not None and c.dtype == torch.bfloat16 and not c.is_inference() for c in first)
    with ctx():
        assert all(c is d for c, d in zip(first, adapter._cached_casts(torch.bfloat16, trainable=True)))
        torch.testing.assert_close(y, _op_by_op(layer, x), rtol=0, atol=0)
    monkeypatch.undo()
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
    layer(x).float().sum().backward()
    opt.step()
    with ctx():
        after = layer(x)
        torch.testing.assert_close(after, _op_by_op(layer, x), rtol=0, atol=0)
    assert not torch.equal(after, y)  # the step is seen, not a stale cast
    x3 = x.view(2, 3, 12)
    with ctx():
        y3 = layer(x3)
    assert y3.shape == (2, 3, 20) and torch.equal(y3, layer(x3))  # 3-D: equal to the autograd path's output


def test_merge_unmerge_round_trip_with_cache():
    layer = _inttune_layer()
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    before = layer(x)
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer(x), _op_by_op(layer, x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), before, rtol=2e-2, atol=2e-2)  # bf16 weight: merge rounds once


def test_inference_mode_does_not_fill_the_cache_with_inference_tensors():
    layer = _inttune_layer()
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    with torch.inference_mode():
        y_inf = layer(x)
    cache = layer.adapters["default"]._cast_cache
    assert cache and not any(t.is_inference() for _, t in cache.values())
    y = layer(x.requires_grad_(True))
    y.float().sum().backward()  # would fail on a cached inference tensor saved for backward
    torch.testing.assert_close(y.detach(), y_inf, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("train", ["all", "middle"])
def test_cuda_out_dtype_gradients(train):
    """On CUDA the fp32 parameter gradients come straight from the bf16 GEMM (aten::mm.dtype, torch >= 2.8)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert nlora.nystrom.mm_out_dtype_works(torch.device("cuda"), torch.bfloat16) == ((major, minor) >= (2, 8))
    torch.manual_seed(0)
    layer = NLoRALinear(nn.Linear(64, 96).to("cuda", torch.bfloat16), rank=8, init="nystrom", train=train)
    with torch.no_grad():
        layer.lora_N.normal_(std=0.3)
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16)
    got, want = [], []
    for on, out in ((True, got), (False, want)):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        with function_path(on):
            y = layer(xg)
        y.float().pow(2).mean().backward()
        out += [y.detach(), xg.grad] + [p.grad for p in layer.adapters.parameters() if p.requires_grad]
    ref = _plain(x.double() @ layer.base.weight.double().T + layer.base.bias.double(), x.double(),
                 layer.lora_A.double(), layer.lora_N.double(), layer.lora_B.double(), layer.scaling, torch.float64)
    torch.testing.assert_close(got[0].double(), ref, rtol=3e-2, atol=3e-2)
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2 * w.abs().max().item())
