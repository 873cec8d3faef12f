"""inject on real module trees: target semantics, freezing, training, and errors that leave the model untouched."""

import copy

import pytest
import torch
from torch import nn

import nlora
from nlora import NLoRALinear

from .conftest import assert_same_state, state_hash
from .model_zoo import pristine


def wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, NLoRALinear))


def tiny_llama():
    return copy.deepcopy(pristine("llama"))


def tiny_bert():
    return copy.deepcopy(pristine("bert"))


def test_list_targets_match_whole_names_or_dotted_suffixes():
    model = nn.ModuleDict({"enc": nn.ModuleDict({"q": nn.Linear(8, 8), "xq": nn.Linear(8, 8)}), "q": nn.Linear(8, 8)})
    nlora.inject(model, ["q"], rank=2, init="lora")
    assert wrapped(model) == ["enc.q", "q"]  # "enc.xq" ends with "q" but not with ".q"


def test_string_target_is_a_fullmatch_regex():
    model = nn.ModuleDict({"layer0": nn.Linear(8, 8), "layer1": nn.Linear(8, 8), "layer10x": nn.Linear(8, 8)})
    nlora.inject(model, r"layer\d", rank=2, init="lora")
    assert wrapped(model) == ["layer0", "layer1"]


def test_mlp_injection_freezes_everything_but_adapters(mlp):
    nlora.inject(mlp, ["0", "2"], rank=3, init="nystrom")
    trainable = sorted(n for n, p in mlp.named_parameters() if p.requires_grad)
    assert trainable == [f"{i}.adapters.default.lora_{m}" for i in (0, 2) for m in "ABN"]
    assert nlora.count_parameters(mlp)[0] == (3 * 24 + 9 + 40 * 3) + (3 * 40 + 9 + 16 * 3)


def test_llama_all_linear_skips_the_head_and_trains():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    nlora.inject(model, "all-linear", rank=4, init="nystrom", preserve_output=True)
    names = wrapped(model)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert {n.split(".")[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_llama_exclude_and_layers_narrow_the_selection():
    model = tiny_llama()
    nlora.inject(model, "all-linear", rank=4, init="slora", exclude=["down_proj", "gate_proj"], layers=[1])
    names = wrapped(model)
    assert len(names) == 5 and all(n.startswith("model.layers.1.") for n in names)


def test_llama_head_can_be_targeted_explicitly():
    model = tiny_llama()
    nlora.inject(model, ["lm_head"], rank=4, init="lora")
    assert wrapped(model) == ["lm_head"]


def test_bert_qkv_injection_with_inttune_and_a_trainable_head():
    model = tiny_bert()
    ids = torch.randint(0, 64, (4, 12))
    labels = torch.tensor([0, 1, 2, 1])
    nlora.inject(model, ["query", "key", "value"], rank=4, init="nystrom", train="middle", trainable=["classifier"])
    assert len(wrapped(model)) == 6
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.endswith("lora_N") or n.startswith("classifier.")}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=labels).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_merge_and_unload_on_llama_matches_adapted_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    nlora.inject(model, "all-linear", rank=4, init="nystrom")
    y = model(ids).logits
    nlora.merge_and_unload(model)
    assert not wrapped(model)
    torch.testing.assert_close(model(ids).logits, y, rtol=1e-4, atol=1e-4)


# ----- errors: clear message, model untouched ---------------------------------------------------------------

def _check_refused(model, exc, match, **kwargs):
    before = state_hash(model)
    structure = repr(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(exc, match=match):
        nlora.inject(model, **kwargs)
    assert_same_state(before, model)
    assert repr(model) == structure
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("rank", [0, -1, 17, 2.5])
def test_bad_rank_is_refused_naming_the_module(mlp, rank):
    where = "4: rank=.*1\\.\\.5" if rank == 17 else "0: rank=.*1\\.\\.24"
    _check_refused(mlp, ValueError, where, targets=["0", "4"], rank=rank, init="lora")


def test_rank_error_on_a_later_module_applies_nothing(mlp):
    # module "0" is fine at rank 10, module "4" (16 -> 5) is not: neither must be wrapped
    _check_refused(mlp, ValueError, "4: rank=10", targets=["0", "4"], rank=10, init="nystrom", preserve_output=True)


def test_target_that_matches_nothing_lists_module_names(mlp):
    _check_refused(mlp, ValueError, r"matched no module.*include: 0, 2, 4", targets=["q_proj"], rank=2)


def test_non_linear_target_is_a_type_error(mlp):
    _check_refused(mlp, TypeError, r"1 \(GELU\)", targets=["0", "1"], rank=2)


def test_non_finite_weights_refused_for_data_driven_init(mlp):
    with torch.no_grad():
        mlp[2].weight[3, 1] = float("nan")
    _check_refused(mlp, ValueError, "2: weight has NaN/Inf", targets=["0", "2"], rank=2, init="nystrom")
    nlora.inject(mlp, ["0", "2"], rank=2, init="slora")  # a random init does not read the weight


def test_unknown_init_and_unknown_option(mlp):
    _check_refused(mlp, ValueError, "unknown init 'nystrum'.*nystrom", targets=["0"], rank=2, init="nystrum")
    _check_refused(mlp, ValueError, r"no option\(s\) \['rcond'\]", targets=["0"], rank=2, init="nystrom", rcond=0.1)
    _check_refused(mlp, ValueError, "index='best'", targets=["0"], rank=2, init="nystrom", index="best")


def test_integer_weights_refused(mlp):
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    _check_refused(model, TypeError, "int8 is not a 16/32/64-bit float.*dequantise", targets=["0"], rank=2, init="lora")


def test_injecting_the_same_adapter_twice_is_refused(mlp):
    nlora.inject(mlp, ["0"], rank=2, init="nystrom")
    _check_refused(mlp, ValueError, "already has an adapter named 'default'", targets=["0"], rank=2)


def test_pissa_cannot_switch_preserve_off(mlp):
    _check_refused(mlp, ValueError, "always rewrites", targets=["0"], rank=2, init="pissa", preserve_output=False)
