"""The behaviour battery: every behaviour x every model x every variant x train mode.

The table is ``MODELS`` (tests/model_zoo.py: MLP, tiny Llama, tiny BERT, tiny GPT-2 with Conv1D) x ``VARIANTS``
(below) x train mode ("all", and "middle" = IntTune where the variant has a trainable middle with a non-zero B).
Each ``test_NN_*`` function is one behaviour row and runs over the whole table through the ``case`` fixture.
``case`` also holds the paper's IntTune (init="nystrom", train="middle"), the one adapter that stores only N and
reads A and B from the base weight; row 15 checks that reading (views of the weight, a frozen copy once it is
written).
To add a row, write one more ``test_NN_<behaviour>(case)``; to add a model or a variant, add one entry to
``MODELS`` or ``VARIANTS``. Rows 11 (save/load, pickling) and 14 (export to PEFT, checked under real PEFT) train an
output head too (``HEADS``), so that extra trainable modules (PEFT's ``modules_to_save``) travel with the adapter.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import nlora
from .conftest import assert_same_state, state_hash
from .model_zoo import MODELS, ModelSpec, fp16_supported, one_thread, pristine  # noqa: F401 (autouse fixture)
from nlora import NLoRALinear
from nlora.checkpoint import read_adapter_config
from nlora.layer import weight_view
from nlora.model import adapter_layers

RANK, ALPHA = 4, 8.0  # scaling 2, so a missing or doubled scaling shows


@dataclass(frozen=True)
class Variant:
    """One adapter configuration and what it promises about the model output at init.

    ``promise``: "exact" (B = 0: output bit-identical), "preserved" (the init delta was subtracted from the base
    weight: equal up to fp32 rounding), "perturbed" (the paper's NLoRA: base untouched, output moves by s C U R).
    ``middle``: train="middle" (IntTune) applies.
    """

    name: str
    init: str
    promise: str
    middle: bool
    options: dict = field(default_factory=dict)


VARIANTS = [
    Variant("lora", "lora", "exact", False),
    Variant("gaussian", "gaussian", "exact", False),
    Variant("slora", "slora", "exact", False),
    Variant("nystrom", "nystrom", "perturbed", True),
    Variant("nystrom+po", "nystrom", "preserved", True, {"preserve_output": True}),
    Variant("nystrom-pinv", "nystrom-pinv", "preserved", True),
    Variant("nystrom-optimal", "nystrom-optimal", "preserved", True),
    Variant("pissa", "pissa", "preserved", True),
]

# Rows where the train mode matters (4, 5, 11, 13, 14) run over TRAIN_CASES; the others over CASES (train="all"),
# which keeps the battery fast: for most variants the middle/all switch only changes which parameters are trainable.
# The exception is the paper's IntTune, nystrom + train="middle" (``READS_BASE``): its adapter stores only N and
# reads A and B from the base weight, a different code path, so CASES hold it too.
READS_BASE = "nystrom"
CASES = ([pytest.param((m, v, "all"), id=f"{m}-{v.name}") for m in MODELS for v in VARIANTS]
         + [pytest.param((m, v, "middle"), id=f"{m}-{v.name}-middle") for m in MODELS for v in VARIANTS
            if v.name == READS_BASE])
TRAIN_CASES = [pytest.param((m, v, t), id=f"{m}-{v.name}-{t}")
               for m in MODELS for v in VARIANTS for t in (("all", "middle") if v.middle else ("all",))]


@dataclass
class Case:
    """One row of the table, with a fresh model, its untouched twin, fixed inputs and the original output."""

    spec: ModelSpec
    variant: Variant
    train: str
    model: nn.Module
    original: nn.Module
    inputs: dict
    y0: torch.Tensor

    def run(self, model: nn.Module | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.spec.run(self.model if model is None else model, self.inputs, dtype)

    def inject(self, model: nn.Module | None = None, **overrides) -> nn.Module:
        kwargs = dict(rank=RANK, alpha=ALPHA, init=self.variant.init, train=self.train, seed=0, **self.variant.options)
        kwargs.update(overrides)
        return nlora.inject(self.model if model is None else model, self.spec.targets, **kwargs)

    def original_weights(self) -> dict[str, torch.Tensor]:
        """``(out, in)`` float64 copies of the original weights of the modules the battery wraps."""
        return {n: weight_view(self.original.get_submodule(n)).double().clone() for n in self.spec.wrapped}


def _case(param) -> Case:
    model_name, variant, train = param
    spec = MODELS[model_name]
    original = pristine(model_name)  # the cached untouched model: read, never modified
    inputs = spec.inputs(torch.Generator().manual_seed(7))
    with torch.no_grad():
        y0 = spec.run(original, inputs)
    return Case(spec, variant, train, spec.model(), original, inputs, y0)


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return _case(request.param)


@pytest.fixture(params=TRAIN_CASES)
def tcase(request) -> Case:
    return _case(request.param)


# -- helpers ------------------------------------------------------------------------------------------------
def perturb(model: nn.Module, adapter: str | None = None, seed: int = 0) -> None:
    """Move adapter parameters away from their init (as training would), so that every delta is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, a in layer.adapters.items():
                if adapter is None or name == adapter:
                    for p in (a.lora_A, a.lora_N, a.lora_B):
                        if p is not None:
                            noise = torch.randn(p.shape, generator=g).to(p.dtype)
                            p.add_(noise * (0.5 * p.float().abs().mean() + 0.02).to(p.dtype))


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def expected_trainable(model: nn.Module, adapters: list[str], train: dict[str, str]) -> set[str]:
    """The parameter names that must train when ``adapters`` are active (``train``: each adapter's mode)."""
    names = set()
    for layer_name, layer in adapter_layers(model).items():
        for a in adapters:
            if a in layer.adapters:
                parts = ("lora_N",) if train[a] == "middle" else ("lora_A", "lora_N", "lora_B")
                names |= {f"{layer_name}.adapters.{a}.{p}" for p in parts
                          if getattr(layer.adapters[a], p) is not None}
    return names


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """``a ≈ b`` up to rounding, with the tolerance scaled to the output's magnitude."""
    torch.testing.assert_close(a.float(), b.float(), rtol=rel, atol=rel * max(b.float().abs().max().item(), 1e-3))


def check_init_promise(case: Case, y: torch.Tensor) -> None:
    """The model output right after an inject, against the original output, as the variant promises."""
    if case.variant.promise == "exact":
        assert torch.equal(y, case.y0), "a B = 0 init must leave the output bit-identical"
    elif case.variant.promise == "preserved":
        close(y, case.y0)
    else:
        assert not torch.equal(y, case.y0), "the paper's NLoRA init moves the output (its size: test_03)"


def dtypes_to_test(model_name: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if fp16_supported(model_name) else [])


# -- 1. injection wraps exactly the intended modules; a pattern that matches nothing raises ---------------------
def test_01_injection_wraps_exactly_the_targets(case):
    before = state_hash(case.model)
    with pytest.raises(ValueError, match=r"targets=\['no_such_module'\]: entries match no module.*nothing was changed"):
        nlora.inject(case.model, ["no_such_module"], rank=RANK, init=case.variant.init)
    assert_same_state(before, case.model)
    case.inject()
    layers = adapter_layers(case.model)
    assert sorted(layers) == sorted(case.spec.wrapped)
    for name, layer in layers.items():
        assert type(layer.base) is type(case.original.get_submodule(name))  # Conv1D stays Conv1D
        assert layer.active_adapters == ("default",) and layer.merged_adapters == ()
        a = layer.adapters["default"]
        c = a.config
        assert (c.rank, c.alpha, c.init, c.train) == (RANK, ALPHA, case.variant.init, case.train)
        assert a.scaling == ALPHA / RANK
        fa, _, fb = a.factors(layer.weight)
        assert fa.shape == (RANK, layer.in_features) and fb.shape == (layer.out_features, RANK)
        assert (a.lora_A is None) == c.reads_base == (case.variant.name == READS_BASE and case.train == "middle")
        assert (a.lora_N is None) == (case.variant.init in ("lora", "gaussian"))
    wrapped_modules = {n for n, m in case.model.named_modules() if isinstance(m, NLoRALinear)}
    assert wrapped_modules == set(case.spec.wrapped)  # nothing else was replaced


# -- 2. outputs finite in fp32 / fp16 / bf16; adapter dtypes as documented ------------------------------------
def test_02_dtypes(case):
    for dtype in dtypes_to_test(case.spec.name):
        _check_dtype(case, case.model if dtype == torch.float32 else case.spec.model().to(dtype), dtype)


def _check_dtype(case: Case, model: nn.Module, dtype: torch.dtype) -> None:
    case.inject(model)
    y = case.run(model, dtype)
    assert y.dtype == dtype and torch.isfinite(y).all()
    for layer in adapter_layers(model).values():  # documented: fp32 master parameters by default
        assert all(p.dtype == torch.float32 for p in layer.adapters["default"].parameters())
        assert weight_view(layer.base).dtype == dtype
    # adapter_dtype= stores them in that dtype (slora: a second Nyström adapter on the residual would sample a core
    # that is ~0, whose pinv overflows fp16; inject refuses that, see test_bad_input)
    case.inject(model, adapter="low", adapter_dtype=dtype, rank=2, init="slora", train="all", preserve_output=None)
    for layer in adapter_layers(model).values():
        assert all(p.dtype == dtype for p in layer.adapters["low"].parameters())
    perturb(model)
    y = case.run(model, dtype)
    assert y.dtype == dtype and torch.isfinite(y).all()


# -- 3. identity at init where promised, the documented perturbation where not ---------------------------------
def test_03_identity_or_documented_perturbation_at_init(case):
    weights = case.original_weights()
    case.inject()
    check_init_promise(case, case.run())
    for name, layer in adapter_layers(case.model).items():
        w0, a = weights[name], layer.adapters["default"]
        w = weight_view(layer.base).double()
        if case.variant.promise == "perturbed":  # the paper's code: s * W[:, :r] W[:r, :r] W[:r, :], base untouched
            expected = (ALPHA / RANK) * w0[:, :RANK] @ w0[:RANK, :RANK] @ w0[:RANK, :]
            torch.testing.assert_close(layer.delta_weight("default").double(), expected, rtol=1e-5, atol=1e-9)
            assert torch.equal(w, w0)
        elif case.variant.promise == "preserved":  # base = W0 - s B0 N0 A0, rounded once
            torch.testing.assert_close(w + layer.delta_weight("default", initial=True).double(), w0, rtol=0, atol=1e-6)
        else:
            assert torch.equal(w, w0) and not a.lora_B.any()
        xin = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = layer(xin).double()
        bias = layer.base.bias.double() if layer.base.bias is not None else 0.0
        moved = layer.delta_weight("default").double() if case.variant.promise == "perturbed" else 0
        promised = xin.double() @ (w0 + moved).T
        torch.testing.assert_close(y, promised + bias, rtol=1e-5, atol=1e-6)


# -- 4. a few optimizer steps change exactly the trainable parameters -----------------------------------------
def test_04_training_changes_only_trainable_parameters(tcase):
    tcase.inject()
    before = {n: p.detach().clone() for n, p in tcase.model.named_parameters()}
    params = [p for p in tcase.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)  # no weight decay: a parameter only moves if it gets a gradient
    tcase.model.train()
    for _ in range(3):
        opt.zero_grad()
        tcase.spec.run(tcase.model, tcase.inputs).float().square().mean().backward()
        opt.step()
    train = trainable(tcase.model)
    assert train == expected_trainable(tcase.model, ["default"], {"default": tcase.train}) and train
    for n, p in tcase.model.named_parameters():
        if n in train:
            assert not torch.equal(p, before[n]), f"{n} is trainable but did not move"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"


# -- 5. requires_grad after inject, set_adapter and in inference ----------------------------------------------
def test_05_requires_grad(tcase):
    tcase.inject()
    modes = {"default": tcase.train, "extra": "all"}
    assert trainable(tcase.model) == expected_trainable(tcase.model, ["default"], modes)
    nlora.inject(tcase.model, tcase.spec.targets, rank=2, init="slora", adapter="extra", seed=1)
    assert trainable(tcase.model) == expected_trainable(tcase.model, ["extra"], modes)
    nlora.set_adapter(tcase.model, "default")
    assert trainable(tcase.model) == expected_trainable(tcase.model, ["default"], modes)
    nlora.set_adapter(tcase.model, ["default", "extra"])
    both = trainable(tcase.model)
    assert both == expected_trainable(tcase.model, ["default", "extra"], modes)
    tcase.model.eval()
    with torch.inference_mode():
        y = tcase.spec.run(tcase.model, tcase.inputs)
    assert not y.requires_grad and trainable(tcase.model) == both


# -- 6. merged == unmerged; unmerge restores; merge_and_unload leaves no wrapper ------------------------------
def test_06_merge_unmerge_merge_and_unload(case):
    case.inject()
    perturb(case.model)
    y = case.run()
    layers = adapter_layers(case.model)
    pre = {n: weight_view(l.base).clone() for n, l in layers.items()}
    nlora.merge(case.model)
    assert all(l.merged_adapters == ("default",) for l in layers.values())
    close(case.run(), y)
    nlora.unmerge(case.model)
    for n, l in layers.items():
        torch.testing.assert_close(weight_view(l.base), pre[n], rtol=0, atol=1e-6)
    close(case.run(), y)
    plain = nlora.merge_and_unload(case.model)
    assert not any(isinstance(m, NLoRALinear) for m in plain.modules())
    assert plain.state_dict().keys() == case.original.state_dict().keys()
    close(case.run(plain), y)


# -- 7. safe=True refuses NaN/Inf and changes nothing; a double merge warns and changes nothing ----------------
def test_07_safe_merge_refuses_nonfinite_and_double_merge_warns(case):
    case.inject()
    perturb(case.model)
    name = case.spec.wrapped[-1]
    adapter = case.model.get_submodule(name).adapters["default"]
    params = adapter.trainable_parameters()  # A, N, B (N alone for IntTune, whose A and B are the base's)
    for bad, param in ((float("nan"), params[-1]), (float("inf"), params[0])):
        good = param.detach().clone()
        with torch.no_grad():
            param[0, 0] = bad
        before = state_hash(case.model)
        with pytest.raises(ValueError, match=rf"{name}: merging would put NaN/Inf"):
            nlora.merge(case.model, safe=True)
        assert_same_state(before, case.model)  # an IntTune adapter did not even copy A and B out of the base
        assert all(not l.merged_adapters for l in adapter_layers(case.model).values())
        assert adapter.reads_base == adapter.config.reads_base
        with torch.no_grad():
            param.copy_(good)
    nlora.merge(case.model, safe=True)
    before = state_hash(case.model)
    with pytest.warns(UserWarning, match="already merged"):
        nlora.merge(case.model)
    assert_same_state(before, case.model)


# -- 8. bf16/fp16 merge -> unmerge -> unload stays within the stated tolerance --------------------------------
def test_08_low_precision_merge_unmerge_unload(case):
    """Stated tolerance: every weight comes back within 4 eps(dtype) x (max|W0| + max|ΔW| + max|ΔW0|), i.e. at most
    one rounding each for the init residual, merge, unmerge and unload (each <= eps/2 of that magnitude)."""
    for dtype in dtypes_to_test(case.spec.name)[1:]:
        _check_low_precision_roundtrip(case, case.spec.model().to(dtype), dtype)


def _check_low_precision_roundtrip(case: Case, model: nn.Module, dtype: torch.dtype) -> None:
    w0 = {n: weight_view(model.get_submodule(n)).float().clone() for n in case.spec.wrapped}
    case.inject(model)
    perturb(model)
    bound = {}
    for n, l in adapter_layers(model).items():
        a = l.adapters["default"]
        d0 = l.delta_weight("default", initial=True).abs().max().item() if a.config.preserve_output else 0.0
        d = l.delta_weight("default").abs().max().item()
        bound[n] = 4 * torch.finfo(dtype).eps * (w0[n].abs().max().item() + d + d0)
    nlora.merge(model)
    assert torch.isfinite(case.run(model, dtype)).all()
    nlora.unmerge(model)
    assert torch.isfinite(case.run(model, dtype)).all()
    nlora.unload(model)
    for n in case.spec.wrapped:
        err = (weight_view(model.get_submodule(n)).float() - w0[n]).abs().max().item()
        assert err <= bound[n], f"{n}: {err:.3g} > {bound[n]:.3g}"


# -- 9. unload gives the base outputs and the original parameter count ----------------------------------------
def test_09_unload_restores_the_original_model(case):
    case.inject()
    perturb(case.model)
    twin = copy.deepcopy(case.model)
    nlora.merge(twin)
    for merged, model in ((False, case.model), (True, twin)):
        _check_unload(case, model, merged)


def _check_unload(case: Case, model: nn.Module, merged: bool) -> None:
    plain = nlora.unload(model)
    assert not any(isinstance(m, NLoRALinear) for m in plain.modules())
    assert nlora.count_parameters(plain)[1] == nlora.count_parameters(case.original)[1]
    assert plain.state_dict().keys() == case.original.state_dict().keys()
    y = case.run(plain)
    if case.variant.promise != "preserved" and not merged:  # the base weight was never touched
        assert_same_state(state_hash(case.original), plain)
        assert torch.equal(y, case.y0)
    else:
        close(y, case.y0)


# -- 10. disable_adapter gives base outputs inside, adapted outputs after -------------------------------------
def test_10_disable_adapter(case):
    case.inject()
    perturb(case.model)
    y_adapted = case.run()
    assert not torch.equal(y_adapted, case.y0)
    with nlora.disable_adapter(case.model):
        y = case.run()
    if case.variant.promise == "preserved":
        close(y, case.y0)
    else:
        assert torch.equal(y, case.y0)
    assert torch.equal(case.run(), y_adapted)
    nlora.merge(case.model)
    y_merged = case.run()
    with nlora.disable_adapter(case.model):
        close(case.run(), case.y0)
    assert torch.equal(case.run(), y_merged)


# -- 11 (part). pickling and deep-copying an adapted model --------------------------------------------------
def test_11_pickle_and_deepcopy(case):
    case.inject()
    perturb(case.model)
    y = case.run()
    for clone in (pickle.loads(pickle.dumps(case.model)), copy.deepcopy(case.model)):
        _check_clone(case, clone, y)


def _check_clone(case: Case, clone: nn.Module, y: torch.Tensor) -> None:
    assert torch.equal(case.run(clone), y)
    assert trainable(clone) == trainable(case.model) and nlora.adapter_names(clone) == ["default"]
    assert_same_state(state_hash(case.model), clone)
    with nlora.disable_adapter(clone):  # the init buffers (non-persistent) travel too
        close(case.run(clone), case.y0)


# -- 12. multiple adapters: add, switch, delete ---------------------------------------------------------------
def test_12_multiple_adapters(case):
    weights = case.original_weights()
    case.inject()
    perturb(case.model, "default")
    y_default = case.run()
    # "d" is a prefix of "default"; the same variant with its own factors. Nyström slices of a preserve_output
    # residual at the same first indices are ~0 (Eq. 6 reproduces them), so "d" samples by norm instead.
    extra = {"index": "norm"} if case.variant.init.startswith("nystrom") else {}
    case.inject(adapter="d", rank=2, seed=5, **extra)
    assert nlora.adapter_names(case.model) == ["default", "d"]
    check_init_promise(case, case.run())  # only "d" is active: it behaves as if it were alone
    perturb(case.model, "d", seed=1)
    nlora.set_adapter(case.model, "default")
    close(case.run(), y_default)
    nlora.set_adapter(case.model, ["default", "d"])
    for name, layer in adapter_layers(case.model).items():  # both deltas (each with its own N) are applied
        xin = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(4))
        delta = sum(layer.delta_weight(n).double()
                    - (layer.delta_weight(n, initial=True).double() if a.config.preserve_output else 0)
                    for n, a in layer.adapters.items())
        bias = layer.base.bias.double() if layer.base.bias is not None else 0.0
        with torch.no_grad():
            torch.testing.assert_close(layer(xin).double(), xin.double() @ (weights[name] + delta).T + bias,
                                       rtol=1e-5, atol=1e-6)
        assert layer.adapters["d"].config.rank == 2 and layer.adapters["default"].config.rank == RANK
    nlora.delete_adapter(case.model, "d")
    assert nlora.adapter_names(case.model) == ["default"]
    assert not any(".adapters.d." in k for k in case.model.state_dict())
    close(case.run(), y_default)
    nlora.delete_adapter(case.model, "default")
    assert not any(isinstance(m, NLoRALinear) for m in case.model.modules())
    close(case.run(), case.y0)


# -- 13. gradient checkpointing gives the same non-zero gradients ---------------------------------------------
def test_13_gradient_checkpointing_same_gradients(tcase):
    tcase.inject()
    perturb(tcase.model)
    twin = copy.deepcopy(tcase.model)
    enable = getattr(twin, "activation_checkpointing_enable", None) or twin.gradient_checkpointing_enable
    enable()  # transformers >= 5.2x renamed it
    grads = []
    for model in (tcase.model, twin):
        model.train()  # HF models only checkpoint in training mode (all dropouts are 0 in the zoo)
        model.zero_grad()
        tcase.spec.run(model, tcase.inputs).float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, f"{n} got no gradient"
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-7)


# -- 11 (part). save/load round trip: bit-exact in fp32, requires_grad as trained -------------------------------
# The output head each model trains in full next to its adapter in rows 11 and 14 (inject(trainable=[...])), so that
# extra trainable modules are saved and exported too. GPT-2 ties lm_head to the input embedding wte.
HEADS = {"mlp": "head", "llama": "lm_head", "bert": "classifier", "gpt2": "lm_head"}


def train_like(model: nn.Module, seed: int = 0) -> None:
    """Move exactly the parameters that require grad, as an optimizer would (A and B stay slices under IntTune)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * (0.5 * p.float().abs().mean() + 0.02)).to(p.dtype))


def head_params(model: nn.Module, head: str) -> set[str]:
    """Names (as ``named_parameters`` reports them, so a tied weight under its first name) of the head's params."""
    ids = {id(p) for p in model.get_submodule(head).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {f"{n}.{a}.{b}": getattr(ad, b) for n, l in adapter_layers(model).items() for a, ad in l.adapters.items()
            for b in ("init_A", "init_N", "init_B", "rows", "cols")}


def test_11_save_load_round_trip_is_exact(tcase, tmp_path):
    head = HEADS[tcase.spec.name]
    tcase.inject(trainable=[head])
    train_like(tcase.model)
    y = tcase.run()
    path = nlora.save_adapter(tcase.model, tmp_path / "a")
    stored = {m: set(r["stored"]) for m, r in read_adapter_config(path)["modules"].items()}
    assert sorted(stored) == sorted(tcase.spec.wrapped)
    if tcase.variant.init.startswith("nystrom") and tcase.train == "middle":  # compact: A, B re-sliced from the base
        assert all(not k & {"lora_A", "lora_B", "init_A", "init_B"} for k in stored.values()), stored
    if tcase.variant.name == READS_BASE and tcase.train == "middle":  # IntTune reading the base: N and where it is
        assert all(k == {"lora_N", "index"} for k in stored.values()), stored
    modes = {"default": tcase.train}
    want = expected_trainable(tcase.model, ["default"], modes) | head_params(tcase.model, head)
    assert trainable(tcase.model) == want
    fresh = tcase.spec.model()
    nlora.load_adapter(fresh, path)
    assert_same_state(state_hash(tcase.model), fresh)  # base weights (residuals too), adapters and head, bitwise
    assert trainable(fresh) == want
    assert torch.equal(tcase.run(fresh), y)
    a, b = adapter_buffers(tcase.model), adapter_buffers(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None) and (a[k] is None or torch.equal(a[k], b[k])), k
    for name, layer in adapter_layers(fresh).items():  # a loaded IntTune adapter reads the (fresh) base again
        assert layer.adapters["default"].reads_base == tcase.model.get_submodule(name).adapters["default"].reads_base
    if tcase.spec.name == "gpt2":  # the tie survives the load
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
    # onto a model that already holds another adapter: the loaded one becomes active, the other is frozen
    other = tcase.spec.model()
    nlora.inject(other, tcase.spec.targets, rank=2, init="slora", adapter="extra", seed=1)
    nlora.load_adapter(other, path)
    assert nlora.adapter_names(other) == ["extra", "default"]
    assert all(l.active_adapters == ("default",) for l in adapter_layers(other).values())
    assert trainable(other) == expected_trainable(other, ["default"], modes) | head_params(other, head)
    assert torch.equal(tcase.run(other), y)
    nlora.set_adapter(other, "extra")
    assert trainable(other) == expected_trainable(other, ["extra"], {"extra": "all"}) | head_params(other, head)


# -- 14. export to PEFT format reproduces the outputs under real PEFT -----------------------------------------
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers, via peft
def test_14_export_peft_reproduces_outputs_under_peft(tcase, tmp_path):
    peft = pytest.importorskip("peft")
    head = HEADS[tcase.spec.name]
    tied = tcase.spec.name == "gpt2"  # lm_head.weight is transformer.wte.weight
    tcase.inject(trainable=[head])
    train_like(tcase.model)
    y = tcase.run()
    if tied:  # PEFT's modules_to_save copies lm_head alone and so unties it from wte: not expressible, refused
        before = state_hash(tcase.model)
        with pytest.raises(ValueError, match=r"trainable modules \['lm_head'\] share weights with "
                                             r"\['transformer\.wte\.weight'\].*include_trainable=False"):
            nlora.export_peft(tcase.model, tmp_path / "p")
        assert_same_state(before, tcase.model)
        assert not (tmp_path / "p").exists()
        # the adapter alone is expressible: compare with the same model whose head was not trained
        with torch.no_grad():
            tcase.model.lm_head.weight.copy_(tcase.original.lm_head.weight)
        y = tcase.run()
    nlora.export_peft(tcase.model, tmp_path / "p", include_trainable=not tied)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    k = 2 if tcase.variant.promise == "preserved" else 1  # relative to the original weights: rank 2r, alpha 2 alpha
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", RANK * k, ALPHA * k)
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    assert cfg["fan_in_fan_out"] is (tcase.spec.name == "gpt2")
    assert cfg["modules_to_save"] == (None if tied else [head])
    pm = peft.PeftModel.from_pretrained(tcase.spec.model(), str(tmp_path / "p")).eval()
    lora_layers = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert lora_layers == set(tcase.spec.wrapped)
    close(tcase.run(pm), y)
    # PEFT's own merge gives the same model as nlora's
    merged = pm.merge_and_unload()
    close(tcase.run(merged), y)
    if tcase.spec.name == "bert":  # the task class adds classifier to modules_to_save and needs its weights: here
        seq = peft.PeftModelForSequenceClassification.from_pretrained(tcase.spec.model(), str(tmp_path / "p")).eval()
        close(tcase.run(seq), y)


# -- 15. IntTune on the paper's init (nystrom, train="middle") stores only N; A and B are the base weight's --------
@pytest.fixture(params=list(MODELS))
def inttune(request) -> Case:
    """The paper's IntTune: init="nystrom" (index="first", base weight untouched), train="middle"."""
    return _case((request.param, next(v for v in VARIANTS if v.name == READS_BASE), "middle"))


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_15_inttune_stores_only_n_and_reads_views_of_the_base_weight(inttune):
    inttune.inject()
    for name, layer in adapter_layers(inttune.model).items():
        a, w = layer.adapters["default"], layer.weight
        assert a.config.reads_base and a.reads_base
        assert a.lora_A is None and a.lora_B is None and a.lora_N.requires_grad
        assert [n for n, _ in a.named_parameters()] == ["lora_N"]
        assert sorted(n for n, _ in a.named_buffers()) == ["cols", "rows"]  # index sets only: no A, B, init copies
        assert [k for k in layer.state_dict() if k.startswith("adapters.")] == ["adapters.default.lora_N"]
        fa, fn, fb = a.factors(w)
        assert fn is a.lora_N
        for live in (fa, fb, layer.lora_A, layer.lora_B):  # views of the weight, no copy (Conv1D: of its transpose)
            assert same_storage(live, w) and same_storage(live, layer.base.weight)
        assert torch.equal(fa, w[:RANK]) and torch.equal(fb, w[:, :RANK])
    # the base weight carries the adapter's A and B, but only N trains (test_04 runs the optimizer)
    inttune.spec.run(inttune.model, inttune.inputs).float().square().mean().backward()
    for layer in adapter_layers(inttune.model).values():
        assert layer.base.weight.grad is None and layer.adapters["default"].lora_N.grad.abs().sum() > 0


def test_15_inttune_keeps_the_original_slices_once_the_base_weight_is_written(inttune):
    weights = inttune.original_weights()
    inttune.inject()
    perturb(inttune.model)  # N moves, as training would
    twin = copy.deepcopy(inttune.model)
    y = inttune.run()
    nlora.merge(inttune.model)
    close(inttune.run(), y)
    for name, layer in adapter_layers(inttune.model).items():
        a = layer.adapters["default"]
        assert not a.reads_base and a.lora_A is not None and a.lora_B is not None
        assert not a.lora_A.requires_grad and not a.lora_B.requires_grad and a.lora_N.requires_grad
        assert not same_storage(a.lora_A, layer.weight) and not same_storage(a.lora_B, layer.weight)
        # a frozen copy of the ORIGINAL slices, bitwise (fp32 -> fp64 is exact), not of the merged weight's
        assert torch.equal(a.lora_A.double(), weights[name][:RANK])
        assert torch.equal(a.lora_B.double(), weights[name][:, :RANK])
        assert not torch.equal(a.lora_A, layer.weight[:RANK]) and not torch.equal(a.lora_B, layer.weight[:, :RANK])
    nlora.unmerge(inttune.model)
    close(inttune.run(), y, rel=1e-6)  # the unmerged weight is W up to rounding; A and B are still W's slices
    for name, layer in adapter_layers(inttune.model).items():
        torch.testing.assert_close(layer.weight.double(), weights[name], rtol=0, atol=1e-6)
        assert torch.equal(layer.adapters["default"].lora_A.double(), weights[name][:RANK])
    # another adapter's residual update writes the base weight too: IntTune keeps its slices and its output
    nlora.inject(twin, inttune.spec.targets, rank=2, init="nystrom-pinv", index="norm", adapter="po", seed=3)
    nlora.set_adapter(twin, "default")
    close(inttune.run(twin), y)
    for name, layer in adapter_layers(twin).items():
        a = layer.adapters["default"]
        assert not a.reads_base and torch.equal(a.lora_A.double(), weights[name][:RANK])
        assert not torch.equal(a.lora_A, layer.weight[:RANK])  # the base now holds the residual of "po"
