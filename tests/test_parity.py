"""PEFT-parity features (issue 4) on real module trees: GPT-2 Conv1D, rank/alpha patterns, layer selection,
multiple named adapters, per-adapter IntTune, merging in sequence, disable_adapter, summary/repr, extra trainables."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nlora
from .conftest import assert_same_state, state_hash
from .model_zoo import MODELS, one_thread  # noqa: F401 (autouse fixture)
from nlora import NLoRALinear
from nlora.layer import is_conv1d, weight_view
from nlora.model import _pattern_value, adapter_layers

transformers = pytest.importorskip("transformers")

GPT2_CONV1D = MODELS["gpt2"].wrapped


def gpt2() -> nn.Module:
    return MODELS["gpt2"].model()


def ids() -> torch.Tensor:
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def perturb_all(model: nn.Module, seed: int = 0) -> None:
    """Move every adapter parameter away from its init, so that every delta (and every N) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if ".adapters." in n):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (0.5 * p.abs().mean() + 0.02))


# -- HF Conv1D -----------------------------------------------------------------------------------------------
def test_core_never_imports_transformers():
    code = "import sys, nlora; assert 'transformers' not in sys.modules, 'nlora imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_gpt2_all_linear_wraps_every_conv1d_and_not_lm_head():
    model = gpt2()
    nlora.inject(model, "all-linear", rank=4)
    layers = adapter_layers(model)
    assert sorted(layers) == sorted(GPT2_CONV1D)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, NLoRALinear)
    for layer in layers.values():
        assert type(layer.base).__name__ == "Conv1D" and is_conv1d(layer.base)
    c_attn = model.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)  # Conv1D stores (in, out): read the right way
    assert c_attn.lora_A.shape == (4, 32) and c_attn.lora_B.shape == (96, 4)


def test_conv1d_forward_merge_and_nystrom_slices_use_the_out_in_layout():
    model = gpt2()
    w0 = model.transformer.h[0].mlp.c_fc.weight.detach().double().clone()  # Conv1D: (in=32, out=128)
    nlora.inject(model, ["c_fc"], rank=4, alpha=8, init="nystrom")
    layer = model.transformer.h[0].mlp.c_fc
    a = layer.adapters["default"]
    w = w0.T  # (out, in), the torch layout the paper's slices are taken in
    torch.testing.assert_close(a.lora_A.double(), w[:4, :])
    torch.testing.assert_close(a.lora_B.double(), w[:, :4])
    torch.testing.assert_close(a.lora_N.double(), w[:4, :4])
    perturb_all(model)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    delta = a.delta_weight().double()  # (out, in)
    with torch.no_grad():
        expected = x.double() @ (w + delta).T + layer.base.bias.double()
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)
        nlora.merge(model)
        torch.testing.assert_close(layer.base.weight.double(), (w + delta).T, rtol=0, atol=1e-6)  # stays (in, out)
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_conv1d_is_detected_by_duck_typing_without_transformers():
    class Conv1D(nn.Module):  # not transformers' class: the same name and layout
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)

    model = nn.Sequential(Conv1D(12, 7), nn.ReLU(), Conv1D(5, 12))
    nlora.inject(model, "all-linear", rank=3, init="pissa")
    assert sorted(adapter_layers(model)) == ["0", "2"]
    assert model[0].lora_A.shape == (3, 7) and model[0].lora_B.shape == (12, 3)

    class NotConv(nn.Module):  # an (in, out) weight without nf is not mistaken for Conv1D
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

    assert not is_conv1d(NotConv())
    with pytest.raises(TypeError, match="only nn.Linear and HF Conv1D"):
        nlora.inject(nn.Sequential(NotConv()), ["0"], rank=2)


# -- rank_pattern / alpha_pattern / layers ---------------------------------------------------------------------
def test_rank_and_alpha_patterns_per_module():
    model = gpt2()
    nlora.inject(model, "all-linear", rank=4, alpha=4, init="slora",
                 rank_pattern={"c_attn": 2, r"h\.1\.mlp\.c_fc": 6, "attn.c_proj": 3},
                 alpha_pattern={"c_proj": 12, "c_attn": 1})
    got = {n: (l.adapters["default"].rank, l.adapters["default"].alpha, l.adapters["default"].scaling)
           for n, l in adapter_layers(model).items()}
    assert got == {
        "transformer.h.0.attn.c_attn": (2, 1, 0.5), "transformer.h.1.attn.c_attn": (2, 1, 0.5),
        "transformer.h.0.attn.c_proj": (3, 12, 4.0), "transformer.h.1.attn.c_proj": (3, 12, 4.0),
        "transformer.h.0.mlp.c_proj": (4, 12, 3.0), "transformer.h.1.mlp.c_proj": (4, 12, 3.0),
        "transformer.h.0.mlp.c_fc": (4, 4, 1.0), "transformer.h.1.mlp.c_fc": (6, 4, 4 / 6),
    }
    for n, l in adapter_layers(model).items():
        r = got[n][0]
        assert l.lora_A.shape[0] == r and l.lora_N.shape == (r, r) and l.lora_B.shape[1] == r


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.v_proj", "model.layers.1.mlp.down_proj",
         "q_proj", "model.q_proj.sub", "xq_proj", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
KEYS = ["q_proj", "v_proj", "q_proj|v_proj", r"layers\.1\..*", r"layers\.1\.mlp\.down_proj", "proj", "attn.c_proj",
        "c_proj", r".*\.0\..*", "sub", "mlp"]


@pytest.mark.parametrize("key", KEYS)
def test_pattern_semantics_match_peft(key):
    other = pytest.importorskip("peft.utils.other")
    for name in NAMES:
        peft_hit = other.get_pattern_key([key], name) == key
        assert (_pattern_value(name, {key: 1}, 0) == 1) == peft_hit, (key, name)
    pattern = {"layers\\.1\\..*": 1, "down_proj": 2}  # the first matching key wins, as in PEFT
    assert _pattern_value("model.layers.1.mlp.down_proj", pattern, 0) == 1


@pytest.mark.parametrize("model_name, layers, prefix", [("llama", [1], "model.layers.1."), ("gpt2", 0, "transformer.h.0."),
                                                        ("bert", [0], "bert.encoder.layer.0.")])
def test_layers_selects_blocks_by_index(model_name, layers, prefix):
    spec = MODELS[model_name]
    model = spec.model()
    nlora.inject(model, spec.targets, rank=2, init="slora", layers=layers)
    wrapped = sorted(adapter_layers(model))
    assert wrapped == sorted(n for n in spec.wrapped if n.startswith(prefix)) and wrapped


def test_layers_with_no_block_index_raises_and_leaves_model_alone():
    model = MODELS["gpt2"].model()
    before = state_hash(model)
    with pytest.raises(ValueError, match="layers=\\[7\\].*matched no module"):
        nlora.inject(model, "all-linear", rank=2, layers=[7])
    assert_same_state(before, model)


# -- multiple named adapters -----------------------------------------------------------------------------------
def two_adapters() -> nn.Module:
    """GPT-2 with adapter "a" (nystrom-optimal, rank 4, train all) and "ab" (pissa, rank 2, IntTune)."""
    model = gpt2()
    nlora.inject(model, "all-linear", rank=4, alpha=8, init="nystrom-optimal", adapter="a")
    nlora.inject(model, ["c_attn", "c_fc"], rank=2, init="pissa", train="middle", adapter="ab")
    return model


def test_prefix_named_adapters_each_have_and_use_their_own_middle():
    model = two_adapters()
    assert nlora.adapter_names(model) == ["a", "ab"]
    layer = model.transformer.h[1].attn.c_attn
    assert layer.active_adapters == ("ab",)
    assert layer.adapters["a"].lora_N.shape == (4, 4) and layer.adapters["ab"].lora_N.shape == (2, 2)
    keys = [k for k in model.state_dict() if k.startswith("transformer.h.1.attn.c_attn.adapters.")]
    assert {k.split(".adapters.")[1] for k in keys} == {"a.lora_A", "a.lora_N", "a.lora_B",
                                                         "ab.lora_A", "ab.lora_N", "ab.lora_B"}
    perturb_all(model)
    nlora.set_adapter(model, ["a", "ab"])
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
        for name in ("a", "ab"):  # zeroing either N changes the output: both middles are in the forward
            saved = layer.adapters[name].lora_N.clone()
            layer.adapters[name].lora_N.zero_()
            assert not torch.allclose(layer(x), y)
            layer.adapters[name].lora_N.copy_(saved)
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_inttune_freezing_is_per_adapter():
    model = two_adapters()
    perturb_all(model)
    nlora.set_adapter(model, ["a", "ab"])
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapters." in n for n in train)
    assert {n.split(".adapters.")[1] for n in train} == {"a.lora_A", "a.lora_N", "a.lora_B", "ab.lora_N"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(ids()).logits.square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in train), n
    nlora.set_adapter(model, "ab")  # switching re-derives requires_grad from the active adapter's train mode
    assert {n.split(".adapters.")[1] for n, p in model.named_parameters() if p.requires_grad} == {"ab.lora_N"}


def test_deleting_one_adapter_leaves_a_prefix_named_one_intact():
    model = two_adapters()
    perturb_all(model)
    nlora.set_adapter(model, "ab")
    keep = {k: v.clone() for k, v in model.state_dict().items() if ".adapters.ab." in k}
    y_ab = logits(model)
    nlora.delete_adapter(model, "a")
    assert nlora.adapter_names(model) == ["ab"]
    state = model.state_dict()
    assert not any(".adapters.a." in k for k in state)
    assert all(torch.equal(state[k], v) for k, v in keep.items())
    # layers that only had "a" (c_proj) are plain Conv1D again; "a"'s init residual was given back
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    torch.testing.assert_close(logits(model), y_ab, rtol=1e-5, atol=1e-5)


def test_inactive_preserve_output_adapter_does_not_leak_into_the_active_one():
    model = gpt2()
    y0 = logits(model)
    nlora.inject(model, "all-linear", rank=4, init="pissa", adapter="first")
    nlora.inject(model, "all-linear", rank=2, init="pissa", adapter="second")  # base = W0 - Δ1 - Δ2 now
    torch.testing.assert_close(logits(model), y0, rtol=1e-5, atol=1e-5)  # only "second" active: still W0
    nlora.set_adapter(model, "first")
    torch.testing.assert_close(logits(model), y0, rtol=1e-5, atol=1e-5)
    perturb_all(model)
    y_first = logits(model)
    plain = nlora.merge_and_unload(copy.deepcopy(model))  # the inactive one's residual goes back too
    torch.testing.assert_close(logits(plain), y_first, rtol=1e-5, atol=1e-5)


def test_set_adapter_errors():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"no adapter named \['abc'\]"):
        nlora.set_adapter(model, "abc")
    nlora.set_adapter(model, "a")
    nlora.merge(model)
    with pytest.raises(ValueError, match="merged; unmerge before switching"):
        nlora.set_adapter(model, "ab")


# -- merging ---------------------------------------------------------------------------------------------------
def test_merging_two_adapters_in_sequence_equals_merging_their_sum():
    model = gpt2().double()
    w0 = {n: weight_view(model.get_submodule(n)).clone() for n in GPT2_CONV1D}
    for name, init in (("a", "slora"), ("ab", "nystrom")):
        nlora.inject(model, "all-linear", rank=3, alpha=6, init=init, adapter=name, adapter_dtype=torch.float64)
    perturb_all(model)
    twin = copy.deepcopy(model)
    nlora.set_adapter(model, "a")
    nlora.merge(model)
    nlora.set_adapter(model, ["a", "ab"])  # "a" stays merged; "ab" is merged on top of it
    nlora.merge(model)
    nlora.set_adapter(twin, ["a", "ab"])
    nlora.merge(twin)
    for n in GPT2_CONV1D:
        layer = model.get_submodule(n)
        assert layer.merged_adapters == ("a", "ab")
        total = sum(a.delta_weight().double() for a in layer.adapters.values())
        torch.testing.assert_close(weight_view(layer.base), w0[n] + total, rtol=0, atol=1e-12)
        torch.testing.assert_close(weight_view(layer.base), weight_view(twin.get_submodule(n).base), rtol=0, atol=1e-12)
    nlora.unmerge(model)
    for n in GPT2_CONV1D:
        torch.testing.assert_close(weight_view(model.get_submodule(n).base), w0[n], rtol=0, atol=1e-12)


def test_deleting_a_merged_adapter_raises_and_changes_nothing():
    model = two_adapters()
    nlora.set_adapter(model, "a")
    nlora.merge(model)
    before = state_hash(model)
    with pytest.raises(ValueError, match="'a' is merged in .*call nlora.unmerge"):
        nlora.delete_adapter(model, "a")
    assert_same_state(before, model)
    assert nlora.adapter_names(model) == ["a", "ab"]


# -- disable_adapter ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init, options", [("nystrom", {}), ("nystrom", {"preserve_output": True}), ("pissa", {}),
                                           ("nystrom-optimal", {}), ("lora", {})])
@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_the_original_pretrained_outputs(init, options, merged):
    model = gpt2()
    y0 = logits(model)
    nlora.inject(model, "all-linear", rank=4, init=init, dropout=0.3, **options)
    perturb_all(model)
    model.train()  # the adapters' dropout is live (the zoo's own dropouts are 0): disabled outputs must stay exact
    with torch.no_grad():
        nlora.set_adapter(model, "default")
        if merged:
            nlora.merge(model)
        with nlora.disable_adapter(model):
            torch.testing.assert_close(model(ids()).logits, y0, rtol=1e-5, atol=1e-5)
            with nlora.disable_adapter(model):  # nested blocks keep the outer one disabled on exit
                pass
            torch.testing.assert_close(model(ids()).logits, y0, rtol=1e-5, atol=1e-5)
    model.eval()
    y_adapted = logits(model)
    assert not torch.allclose(y_adapted, y0, rtol=1e-4, atol=1e-5)
    with nlora.disable_adapter(model):
        torch.testing.assert_close(logits(model), y0, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(model), y_adapted)


def test_disable_adapter_with_several_preserve_output_adapters():
    model = gpt2()
    y0 = logits(model)
    nlora.inject(model, "all-linear", rank=4, init="pissa", adapter="p")
    nlora.inject(model, ["c_attn"], rank=2, init="nystrom", preserve_output=True, adapter="n")
    perturb_all(model)
    nlora.set_adapter(model, ["p", "n"])
    nlora.merge(model)
    with nlora.disable_adapter(model):
        torch.testing.assert_close(logits(model), y0, rtol=1e-5, atol=1e-5)


# -- summary and repr -----------------------------------------------------------------------------------------
def test_trainable_summary_table():
    model = two_adapters()
    nlora.set_adapter(model, ["a", "ab"])
    text = nlora.trainable_summary(model)
    lines = text.splitlines()
    assert lines[0].split() == ["module", "count", "out", "x", "in", "rank", "adapter:init/train", "trainable"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == {"c_attn", "c_proj", "c_fc"}
    assert rows["c_attn"][1:5] == ["2", "96x32", "2,4", "a:nystrom-optimal/all,ab:pissa/middle"]
    assert rows["c_proj"][1:5] == ["4", "32x128,32x32", "4", "a:nystrom-optimal/all"]
    per_group = {k: sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and f".{k}.adapters." in n)
                 for k in rows}
    assert {k: int(r[-1].replace(",", "")) for k, r in rows.items()} == per_group
    trainable, total = nlora.count_parameters(model)
    assert lines[-1] == (f"trainable params: {trainable:,} || all params: {total:,} || "
                         f"trainable%: {100 * trainable / total:.4f}")
    assert trainable == sum(per_group.values())


def test_repr_says_layout_shape_rank_init_and_train_mode():
    model = two_adapters()
    text = repr(model.transformer.h[0].attn.c_attn)
    assert "Conv1D in=32, out=96, active=['ab'], merged=[]" in text
    assert "rank=4, alpha=8, init='nystrom-optimal', train='all'" in text
    assert "rank=2, alpha=2, init='pissa', train='middle'" in text
    linear = nn.Sequential(nn.Linear(6, 5))
    nlora.inject(linear, ["0"], rank=3, init="slora")
    assert "Linear in=6, out=5" in repr(linear[0]) and "init='slora', train='all'" in repr(linear[0])


# -- extra trainable modules ----------------------------------------------------------------------------------
def test_trainable_classifier_is_trained_fully_and_not_adapted():
    model = MODELS["bert"].model()
    nlora.inject(model, "all-linear", rank=2, init="nystrom", train="middle", trainable=["classifier"])
    assert "classifier" not in adapter_layers(model) and isinstance(model.classifier, nn.Linear)
    assert "bert.pooler.dense" in adapter_layers(model)
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= train
    assert train - {"classifier.weight", "classifier.bias"} == {
        f"{n}.adapters.default.lora_N" for n in adapter_layers(model)}
    assert "fully trained modules: classifier (99 params)" in nlora.trainable_summary(model)
    nlora.inject(model, ["query"], rank=2, init="slora", adapter="second")  # stays trainable across adapters
    assert model.classifier.weight.requires_grad
    w = model.classifier.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**MODELS["bert"].inputs(torch.Generator().manual_seed(0))).logits.square().sum().backward()
    opt.step()
    assert not torch.equal(model.classifier.weight, w)
    nlora.unload(model)
    assert not any(hasattr(m, "_nlora_trainable") for m in model.modules())


def test_trainable_errors():
    model = MODELS["bert"].model()
    before = state_hash(model)
    with pytest.raises(ValueError, match=re.escape("['scorer'] matched no module")):
        nlora.inject(model, ["query"], rank=2, trainable=["scorer"])
    with pytest.raises(TypeError, match="must be a list of module names"):
        nlora.inject(model, ["query"], rank=2, trainable="classifier")
    with pytest.raises(ValueError, match="only matched the trainable modules"):
        nlora.inject(model, ["classifier"], rank=2, trainable=["classifier"])
    assert_same_state(before, model)
    assert not any(isinstance(m, NLoRALinear) for m in model.modules())
