"""Module-tree operations (nlora/model.py) on real models: which modules inject picks (targets, "all-linear",
exclude, layers, rank/alpha patterns), what it freezes and trains (trainable modules), named adapters (set, delete,
disable), the warnings of merge/unmerge and of a faithful Nyström init, seeded per-module draws, unload and
merge_and_unload. Bad input in general is tests/test_bad_input.py's table; the layer itself is tests/test_layer.py."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import nlora
from nlora import NLoRALinear
from nlora.layer import is_conv1d, weight_view
from nlora.model import _pattern_value, adapter_layers

from .conftest import assert_same_state, state_hash
from .model_zoo import MODELS, one_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("transformers")
LLAMA_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def wrapped(model: nn.Module) -> list[str]:
    return sorted(adapter_layers(model))


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits


def perturb_all(model: nn.Module, seed: int = 0) -> None:
    """Move every adapter parameter away from its init, so that every delta (and every N) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if ".adapters." in n):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (0.5 * p.abs().mean() + 0.02))


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def refused(model: nn.Module, exc: type[Exception], match: str, call) -> None:
    """``call(model)`` raises ``exc`` matching ``match`` and leaves the model exactly as it was."""
    before, structure, grads = state_hash(model), repr(model), trainable(model)
    with pytest.raises(exc, match=match):
        call(model)
    assert_same_state(before, model)
    assert repr(model) == structure and trainable(model) == grads


# -- targets ------------------------------------------------------------------------------------------------------
def test_list_targets_match_whole_names_or_dotted_suffixes():
    model = nn.ModuleDict({"enc": nn.ModuleDict({"q": nn.Linear(8, 8), "xq": nn.Linear(8, 8)}), "q": nn.Linear(8, 8)})
    nlora.inject(model, ["q"], rank=2, init="lora")
    assert wrapped(model) == ["enc.q", "q"]  # "enc.xq" ends with "q" but not with ".q"


def test_string_target_is_a_fullmatch_regex():
    model = nn.ModuleDict({"layer0": nn.Linear(8, 8), "layer1": nn.Linear(8, 8), "layer10x": nn.Linear(8, 8)})
    nlora.inject(model, r"layer\d", rank=2, init="lora")
    assert wrapped(model) == ["layer0", "layer1"]


def test_every_entry_of_a_target_or_trainable_list_must_match_and_close_names_are_suggested():
    llama, bert = MODELS["llama"].model(), MODELS["bert"].model()
    refused(llama, ValueError, re.escape("targets=['q_proj', 'v_prj', 'zzz']: entries match no module of "
                                         "LlamaForCausalLM: 'v_prj' (did you mean 'v_proj'"),
            lambda m: nlora.inject(m, ["q_proj", "v_prj", "zzz"], rank=2))  # "q_proj" alone would have matched
    with pytest.raises(ValueError, match=r"'zzz'; nothing was changed$"):  # no close name: no suggestion
        nlora.inject(llama, ["q_proj", "zzz"], rank=2)
    refused(bert, ValueError, re.escape("trainable=['clasifier']: entries match no module of "
                                        "BertForSequenceClassification: 'clasifier' (did you mean 'classifier'"),
            lambda m: nlora.inject(m, ["query"], rank=2, trainable=["clasifier"]))
    assert not adapter_layers(llama) and not adapter_layers(bert)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_all_linear_leaves_the_output_head_out(model_name):
    spec = MODELS[model_name]
    model = spec.model()
    nlora.inject(model, "all-linear", rank=4, init="nystrom-pinv")
    assert wrapped(model) == sorted(spec.wrapped) and "lm_head" not in wrapped(model)
    assert isinstance(model.lm_head, nn.Linear) and model.get_output_embeddings() is model.lm_head
    if model_name == "gpt2":  # Conv1D stores (in, out): read the right way round
        c_attn = model.transformer.h[0].attn.c_attn
        assert is_conv1d(c_attn.base) and (c_attn.in_features, c_attn.out_features) == (32, 96)
        assert c_attn.lora_A.shape == (4, 32) and c_attn.lora_B.shape == (96, 4)
    else:
        assert {n.split(".")[-1] for n in wrapped(model)} == LLAMA_LEAVES
    head = MODELS["llama"].model()
    nlora.inject(head, ["lm_head"], rank=4, init="lora")  # named explicitly, the head is adapted
    assert wrapped(head) == ["lm_head"]


def test_all_linear_leaves_out_the_module_get_output_embeddings_names():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.score = nn.Linear(8, 3)

        def get_output_embeddings(self):
            return self.score

        def forward(self, x):
            return self.score(self.body(x))

    model = Tiny()
    nlora.inject(model, "all-linear", rank=2, init="lora")
    assert wrapped(model) == ["body"]


def test_exclude_and_layers_narrow_the_selection():
    model = MODELS["llama"].model()
    nlora.inject(model, "all-linear", rank=4, init="slora", exclude=["down_proj", "gate_proj"], layers=[1])
    names = wrapped(model)
    assert len(names) == 5 and all(n.startswith("model.layers.1.") for n in names)


@pytest.mark.parametrize("model_name, layers, prefix", [("llama", [1], "model.layers.1."),
                                                        ("gpt2", 0, "transformer.h.0."),
                                                        ("bert", [0], "bert.encoder.layer.0.")])
def test_layers_selects_blocks_by_index(model_name, layers, prefix):
    spec = MODELS[model_name]
    model = spec.model()
    nlora.inject(model, spec.targets, rank=2, init="slora", layers=layers)
    assert wrapped(model) == sorted(n for n in spec.wrapped if n.startswith(prefix)) and wrapped(model)
    refused(spec.model(), ValueError, r"layers=\[7\]\).*matched no module",
            lambda m: nlora.inject(m, spec.targets, rank=2, layers=[7]))


def test_rank_and_alpha_patterns_per_module():
    model = MODELS["gpt2"].model()
    nlora.inject(model, "all-linear", rank=4, alpha=4, init="slora",
                 rank_pattern={"c_attn": 2, r"h\.1\.mlp\.c_fc": 6, "attn.c_proj": 3},
                 alpha_pattern={"c_proj": 12, "c_attn": 1})
    got = {n: (layer.adapters["default"].config.rank, layer.adapters["default"].config.alpha, layer.scaling)
           for n, layer in adapter_layers(model).items()}
    assert got == {
        "transformer.h.0.attn.c_attn": (2, 1, 0.5), "transformer.h.1.attn.c_attn": (2, 1, 0.5),
        "transformer.h.0.attn.c_proj": (3, 12, 4.0), "transformer.h.1.attn.c_proj": (3, 12, 4.0),
        "transformer.h.0.mlp.c_proj": (4, 12, 3.0), "transformer.h.1.mlp.c_proj": (4, 12, 3.0),
        "transformer.h.0.mlp.c_fc": (4, 4, 1.0), "transformer.h.1.mlp.c_fc": (6, 4, 4 / 6),
    }
    for n, layer in adapter_layers(model).items():
        r = got[n][0]
        assert layer.lora_A.shape[0] == r and layer.lora_N.shape == (r, r) and layer.lora_B.shape[1] == r


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


# -- freezing and trainable modules ------------------------------------------------------------------------------
def test_inject_freezes_everything_but_the_adapters(mlp):
    nlora.inject(mlp, ["0", "2"], rank=3, init="nystrom")
    assert sorted(trainable(mlp)) == [f"{i}.adapters.default.lora_{m}" for i in (0, 2) for m in "ABN"]
    assert nlora.count_parameters(mlp)[0] == (3 * 24 + 9 + 40 * 3) + (3 * 40 + 9 + 16 * 3)
    nlora.inject(mlp, ["0", "2"], rank=3, init="nystrom", train="middle", adapter="it", index="norm")
    # IntTune on the paper's init: only N exists and trains (A, B are the base weight's rows and columns)
    assert trainable(mlp) == {"0.adapters.it.lora_N", "2.adapters.it.lora_N"}
    assert nlora.count_parameters(mlp)[0] == 2 * 9


def test_trainable_modules_are_trained_in_full_never_wrapped_and_cleared_by_unload():
    model = MODELS["bert"].model()
    nlora.inject(model, "all-linear", rank=2, init="nystrom", train="middle", trainable=["classifier"])
    assert "classifier" not in adapter_layers(model) and isinstance(model.classifier, nn.Linear)
    assert "bert.pooler.dense" in adapter_layers(model)
    assert trainable(model) == {"classifier.weight", "classifier.bias"} | {
        f"{n}.adapters.default.lora_N" for n in adapter_layers(model)}
    assert "fully trained modules: classifier" in nlora.trainable_summary(model)
    nlora.inject(model, ["query"], rank=2, init="slora", adapter="second")  # stays trainable across adapters
    assert model.classifier.weight.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**MODELS["bert"].inputs(torch.Generator().manual_seed(0))).logits.square().sum().backward()
    opt.step()
    for n, p in model.named_parameters():  # ("second" is slora: B = 0, so its A gets no gradient yet)
        assert torch.equal(p, before[n]) or n in trainable(model), n
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])
    refused(model, ValueError, "only matched the trainable modules",
            lambda m: nlora.inject(m, ["classifier"], rank=2, adapter="third", trainable=["classifier"]))
    nlora.unload(model)
    assert not any(hasattr(m, "_nlora_trainable") for m in model.modules())


def test_llama_training_lowers_the_loss():
    model = MODELS["llama"].model()
    x = ids()
    nlora.inject(model, "all-linear", rank=4, init="nystrom", preserve_output=True, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("train", ["all", "middle"])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, train):
    """IntTune's A and B are views of the base weight read again in the recomputed forward."""
    model = MODELS["llama"].model()
    nlora.inject(model, "all-linear", rank=4, init="nystrom", train=train, seed=0)
    perturb_all(model)
    twin = copy.deepcopy(model)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(twin, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        twin.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        assert twin.is_activation_checkpointing
    else:
        twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert twin.is_gradient_checkpointing
    grads = []
    for m in (model, twin):
        m.train()
        m(ids(), labels=ids()).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert grads[1][n] is not None and g.abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


# -- named adapters ------------------------------------------------------------------------------------------------
def two_adapters() -> nn.Module:
    """GPT-2 with adapter "a" (nystrom-optimal, rank 4, train all) and "ab" (nystrom, rank 2, IntTune)."""
    model = MODELS["gpt2"].model()
    nlora.inject(model, "all-linear", rank=4, alpha=8, init="nystrom-optimal", adapter="a")
    nlora.inject(model, ["c_attn", "c_fc"], rank=2, init="nystrom", train="middle", adapter="ab", index="norm",
                 seed=0)
    return model


def test_set_adapter_activates_and_rederives_what_trains_per_adapter():
    model = two_adapters()
    assert nlora.adapter_names(model) == ["a", "ab"]
    layer = model.transformer.h[1].attn.c_attn
    assert layer.active_adapters == ("ab",)  # inject makes the new adapter the only active one
    assert {n.split(".adapters.")[1] for n in trainable(model)} == {"ab.lora_N"}
    nlora.set_adapter(model, ["a", "ab"])
    assert layer.active_adapters == ("a", "ab") and model.transformer.h[0].attn.c_proj.active_adapters == ("a",)
    assert {n.split(".adapters.")[1] for n in trainable(model)} == {"a.lora_A", "a.lora_N", "a.lora_B", "ab.lora_N"}
    nlora.set_adapter(model, "a")
    assert {n.split(".adapters.")[1] for n in trainable(model)} == {"a.lora_A", "a.lora_N", "a.lora_B"}
    assert not layer.adapters["ab"].lora_N.requires_grad


def test_deleting_one_adapter_leaves_a_prefix_named_one_intact():
    model = two_adapters()
    perturb_all(model)
    nlora.set_adapter(model, "ab")
    keep = {k: v.clone() for k, v in model.state_dict().items() if ".adapters.ab." in k}
    y_ab = logits(model)
    nlora.delete_adapter(model, "a")
    assert nlora.adapter_names(model) == ["ab"]
    state = model.state_dict()
    assert not any(".adapters.a." in k for k in state) and keep
    assert all(torch.equal(state[k], v) for k, v in keep.items())
    # layers that only had "a" are plain Conv1D again; "a"'s init residual was given back
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    torch.testing.assert_close(logits(model), y_ab, rtol=1e-5, atol=1e-5)


def test_disable_adapter_blocks_nest_and_restore_the_outer_state():
    model = MODELS["gpt2"].model()
    y0 = logits(model)
    nlora.inject(model, "all-linear", rank=4, init="pissa", adapter="p")
    nlora.inject(model, ["c_attn"], rank=2, init="nystrom", adapter="n", dropout=0.3)
    perturb_all(model)
    nlora.set_adapter(model, ["p", "n"])
    nlora.merge(model)
    model.train()  # live adapter dropout must not reach the disabled output
    y = logits(model)
    with nlora.disable_adapter(model):
        torch.testing.assert_close(logits(model), y0, rtol=1e-5, atol=1e-5)
        with nlora.disable_adapter(model):
            pass
        torch.testing.assert_close(logits(model), y0, rtol=1e-5, atol=1e-5)  # still disabled after the inner block
    assert torch.equal(logits(model), y)
    with pytest.raises(KeyError), nlora.disable_adapter(model):
        raise KeyError("an error inside the block")
    assert not any(layer.disabled for layer in adapter_layers(model).values())


# -- warnings ------------------------------------------------------------------------------------------------------
def _recorded(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught]


def test_merge_and_unmerge_warn_once_per_call_when_there_is_nothing_to_do():
    model = MODELS["llama"].model()
    nlora.inject(model, "all-linear", rank=2, init="slora")
    assert len(adapter_layers(model)) == 14
    assert _recorded(lambda: nlora.unmerge(model)) == ["no adapter is merged; unmerge did nothing"]
    assert _recorded(lambda: nlora.merge(model)) == []
    assert _recorded(lambda: nlora.merge(model)) == ["every active adapter is already merged; merge did nothing"]
    assert _recorded(lambda: nlora.unmerge(model)) == []
    nlora.merge(model)
    assert _recorded(lambda: nlora.merge_and_unload(model)) == []  # already merged: nothing to warn about


def _scaled_model(factor: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(3)])
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(factor)
    return model


def test_a_faithful_nystrom_init_that_moves_the_layers_a_lot_warns_once():
    """nn.Linear(32, 32) weights have σ² = 1/96; ×3 gives r·σ² = 8 · 9/96 = 0.75 > 0.2 for rank 8."""
    model = _scaled_model(3.0)
    caught = _recorded(lambda: nlora.inject(model, "all-linear", rank=8, init="nystrom"))
    assert len(caught) == 1 and "init 'nystrom' keeps the base weights" in caught[0]
    assert "Pass preserve_output=True" in caught[0] and "r*sigma^2 = 0.75" in caught[0]
    assert _recorded(lambda: nlora.inject(_scaled_model(3.0), "all-linear", rank=8, init="nystrom",
                                          preserve_output=True)) == []
    assert _recorded(lambda: nlora.inject(_scaled_model(3.0), "all-linear", rank=8, init="nystrom-pinv")) == []
    assert _recorded(lambda: nlora.inject(_scaled_model(1.0), "all-linear", rank=8, init="nystrom")) == []


# -- seeds ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init, options", [("slora", {}), ("nystrom", {"index": "random"})])
def test_seed_gives_each_module_draws_that_do_not_depend_on_the_other_targets(init, options):
    def draws(targets):
        model = MODELS["llama"].model()
        nlora.inject(model, targets, rank=2, init=init, seed=7, **options)
        ad = model.model.layers[1].self_attn.q_proj.adapters["default"]
        return ad.lora_A.detach().clone(), ad.rows, model

    a_all, rows_all, model = draws("all-linear")
    a_one, rows_one, _ = draws([r"model.layers.1.self_attn.q_proj"])
    assert torch.equal(a_all, a_one) and (rows_all is None or torch.equal(rows_all, rows_one))
    other = model.model.layers[0].self_attn.q_proj.adapters["default"]  # same shape, another name: another draw
    assert not torch.equal(other.lora_A, a_all)


# -- unload / merge_and_unload ---------------------------------------------------------------------------------------
def test_merge_and_unload_and_unload_give_plain_models():
    model = MODELS["llama"].model()
    y0 = logits(model)
    nlora.inject(model, "all-linear", rank=4, init="pissa", adapter="first")
    nlora.inject(model, "all-linear", rank=2, init="nystrom", adapter="second")
    perturb_all(model)
    nlora.set_adapter(model, "first")  # "second" is inactive, "first" moved the base weights
    y = logits(model)
    merged = nlora.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, NLoRALinear) for m in merged.modules())
    assert merged.state_dict().keys() == MODELS["llama"].model().state_dict().keys()
    torch.testing.assert_close(logits(merged), y, rtol=1e-4, atol=1e-4)
    plain = nlora.unload(model)
    assert not any(isinstance(m, NLoRALinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), y0, rtol=1e-5, atol=1e-5)
    original = MODELS["llama"].model().state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6, msg=k)


# -- summary and imports --------------------------------------------------------------------------------------------
def test_merge_and_unload_refuses_pending_adapters_before_changing_anything():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    nlora.inject(model, ["0"], rank=2, init="slora", seed=0)
    with torch.device("meta"):
        model[2] = nn.Linear(5, 4)
    nlora.inject(model, ["2"], rank=2, init="slora", adapter="late")
    nlora.set_adapter(model, ["default", "late"])
    with pytest.raises(ValueError, match=r"\['2'\] were injected on the meta device .* nothing was changed"):
        nlora.merge_and_unload(model)
    assert [type(m).__name__ for m in model] == ["NLoRALinear", "ReLU", "NLoRALinear"]
    assert model[0].merged_adapters == ()


def test_trainable_summary_table():
    model = two_adapters()
    nlora.set_adapter(model, ["a", "ab"])
    lines = nlora.trainable_summary(model).splitlines()
    assert lines[0].split() == ["module", "count", "out", "x", "in", "rank", "adapter:init/train", "trainable"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == {"c_attn", "c_proj", "c_fc"}
    assert rows["c_attn"][1:5] == ["2", "96x32", "2,4", "a:nystrom-optimal/all,ab:nystrom/middle"]
    assert rows["c_proj"][1:5] == ["4", "32x128,32x32", "4", "a:nystrom-optimal/all"]
    per_group = {k: sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and f".{k}.adapters." in n)
                 for k in rows}
    assert {k: int(r[-1].replace(",", "")) for k, r in rows.items()} == per_group
    n_trainable, total = nlora.count_parameters(model)
    assert lines[-1] == (f"trainable params: {n_trainable:,} || all params: {total:,} || "
                         f"trainable%: {100 * n_trainable / total:.4f}")
    assert n_trainable == sum(per_group.values())
    text = repr(model.transformer.h[0].attn.c_attn)
    assert "Conv1D in=32, out=96, active=['a', 'ab'], merged=[]" in text
    assert "rank=4, alpha=8, init='nystrom-optimal', train='all'" in text
    assert weight_view(model.transformer.h[0].attn.c_attn.base).shape == (96, 32)


def test_core_never_imports_transformers():
    code = "import sys, nlora; assert 'transformers' not in sys.modules, 'nlora imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_all_linear_leaves_classification_heads_out():
    """Like PEFT: the classifier of a *ForSequenceClassification model is not adapted; trainable=[...] trains it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    nlora.inject(model, "all-linear", rank=4, init="slora", trainable=["classifier"])
    layers = nlora.adapter_layers(model)
    assert "classifier" not in layers and "bert.pooler.dense" in layers
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_a_quantised_or_wrapped_weight_is_refused_before_anything_reads_it():
    class Wrapped(torch.Tensor):  # stands for torchao / bitsandbytes weight subclasses
        pass

    model = nn.Sequential(nn.Linear(8, 6))
    model[0].weight = nn.Parameter(torch.randn(6, 8).as_subclass(Wrapped), requires_grad=False)
    with pytest.raises(TypeError, match=r"^0: the weight is a Wrapped \(a quantised or wrapped tensor\).*dequantise"):
        nlora.inject(model, ["0"], rank=2, init="nystrom")
    assert not nlora.adapter_layers(model)


@pytest.mark.parametrize("name", [("a",), ["a"], None], ids=["tuple", "list", "none"])
def test_delete_adapter_refuses_a_name_that_is_not_one_of_its_adapters_by_value(name):
    """delete_adapter takes one name: a tuple or list holding a known name, or None, is no adapter of the model and
    must be refused with the usual ValueError (b79a82d), not deleted silently as nothing (tuple) or a TypeError."""
    model = two_adapters()
    with pytest.raises(ValueError, match=r"no adapter named .*; the model has \['a', 'ab'\]"):
        nlora.delete_adapter(model, name)
    assert nlora.adapter_names(model) == ["a", "ab"]
