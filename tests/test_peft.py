"""Export to a plain HF PEFT LoRA (nlora.export_peft), checked by loading it with real PEFT; and merge_and_unload +
save_pretrained, which gives a plain HF model with no nlora inside."""

import copy
import json
import os
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import nlora
from nlora import NLoRALinear
from nlora.layer import weight_view
from nlora.peft import _patterns, peft_factors

from .test_checkpoint import fake_training, make_mlp, round_trip, snapshot, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:init '.*' keeps the base weights:UserWarning")


def peft_load(base, path):
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(base, str(path)).eval()


def close(a, b):
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def peft_config(path):
    return json.loads((path / "adapter_config.json").read_text())


EXPORT_CASES = [("lora", "all"), ("gaussian", "all"), ("slora", "all"), ("nystrom", "middle"), ("nystrom", "all"),
                ("nystrom-pinv", "middle"), ("nystrom-pinv", "all"), ("nystrom-optimal", "middle"),
                ("nystrom-optimal", "all"), ("pissa", "middle"), ("pissa", "all")]


@pytest.mark.parametrize("init,train", EXPORT_CASES)
def test_export_peft_mlp_matches_nlora(tmp_path, init, train):
    pytest.importorskip("peft")
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2", "4"], rank=4, alpha=6, init=init, train=train, seed=0, rank_pattern={"4": 2},
                 alpha_pattern={"2": 3})
    fake_training(model)
    nlora.export_peft(model, tmp_path / "p")
    cfg = peft_config(tmp_path / "p")
    k = 2 if model[0].adapters["default"].config.preserve_output else 1  # [A; A0], [B N, -B0 N0]: r and alpha double
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["0", "2", "4"]
    assert (cfg["r"], cfg["lora_alpha"]) == (4 * k, 6 * k)
    assert cfg["rank_pattern"] == {"4": 2 * k} and cfg["alpha_pattern"] == {"2": 3 * k}
    assert sorted(os.listdir(tmp_path / "p")) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(tmp_path / "p" / "adapter_model.safetensors"))
    assert keys == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in "024" for x in "AB")
    x = torch.randn(6, 24)
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    with torch.no_grad():
        close(model(x), pm(x))


def test_export_peft_llama_all_linear_keeps_the_head_out(tmp_path):
    pytest.importorskip("peft")
    original = tiny_llama()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init="nystrom-pinv", train="middle", seed=0,
                 rank_pattern={"down_proj": 2}, trainable=["model.norm"])
    fake_training(model)
    nlora.export_peft(model, tmp_path / "p")
    cfg = peft_config(tmp_path / "p")
    assert len(cfg["target_modules"]) == 14 and not any("lm_head" in t for t in cfg["target_modules"])
    assert cfg["modules_to_save"] == ["model.norm"]
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    assert "lora_A" not in str(pm.base_model.model.lm_head)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        close(model(ids), pm(ids))


def test_export_peft_gpt2_conv1d_sets_fan_in_fan_out(tmp_path):
    pytest.importorskip("peft")
    original = tiny_gpt2()
    model = copy.deepcopy(original)
    nlora.inject(model, ["c_attn", "c_fc"], rank=4, init="pissa", seed=0)
    fake_training(model)
    nlora.export_peft(model, tmp_path / "p")
    assert peft_config(tmp_path / "p")["fan_in_fan_out"] is True
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        close(model(ids), pm(ids))


def test_export_after_load_uses_the_restored_initial_factors(tmp_path):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom-optimal", train="middle", seed=0)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)  # compact: A0 and B0 sliced again from the base
    nlora.export_peft(model, tmp_path / "p1")
    nlora.export_peft(fresh, tmp_path / "p2")
    assert snapshot(tmp_path / "p1") == snapshot(tmp_path / "p2")


def test_export_uses_a_regex_when_a_name_list_would_match_too_much(tmp_path):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))  # "0" and "1.0"
    model = copy.deepcopy(original)
    nlora.inject(model, r"0", rank=2, init="slora", seed=0)
    fake_training(model)
    nlora.export_peft(model, tmp_path / "p")
    assert peft_config(tmp_path / "p")["target_modules"] == "(0)"
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    assert "lora" not in str(pm.base_model.model[1])
    x = torch.randn(3, 8)
    with torch.no_grad():
        close(model(x), pm(x))


def test_export_refuses_merged_and_foreign_residuals(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="pissa", adapter="a")
    nlora.inject(model, ["0"], rank=2, init="lora", adapter="b")
    with pytest.raises(ValueError, match=r"adapters \['a'\] also rewrote"):
        nlora.export_peft(model, tmp_path / "p", adapter="b")
    nlora.merge(model)
    with pytest.raises(ValueError, match="merged"):
        nlora.export_peft(model, tmp_path / "p", adapter="b")
    assert not (tmp_path / "p").exists()


def test_peft_pattern_resolution_matches_peft():
    other = pytest.importorskip("peft.utils.other")
    values = {"0": 4, "layers.0": 8, "layers.0.q": 2, "x.layers.0": 4, "h11": 8, "h.1": 2}
    pattern = _patterns(values, 8, "rank")
    for name, v in values.items():
        assert pattern.get(other.get_pattern_key(list(pattern), name), 8) == v, name


@given(out_f=st.integers(2, 12), in_f=st.integers(2, 12), r=st.integers(1, 4), seed=st.integers(0, 2**16),
       init=st.sampled_from(["lora", "slora", "nystrom", "nystrom-pinv", "pissa"]), preserve=st.booleans(),
       middle=st.booleans())
def test_peft_factors_are_the_delta_from_the_original_weight(out_f, in_f, r, seed, init, preserve, middle):
    r = min(r, out_f, in_f)
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    w0 = lin.weight.detach().double().clone()
    preserve = True if init == "pissa" else preserve
    train = "middle" if middle and init not in ("lora", "slora") else "all"
    layer = NLoRALinear(lin, rank=r, alpha=2.0 * r, init=init, train=train, preserve_output=preserve,
                        generator=torch.Generator().manual_seed(seed))
    fake_training(layer, seed=seed, scale=0.3)
    ad = layer.adapters["default"]
    a, b = peft_factors(ad, layer.weight, torch.float64)
    assert a.shape[0] == r * (2 if ad.config.preserve_output else 1)
    # the exported LoRA on the ORIGINAL weight gives the adapted layer's effective weight
    effective = weight_view(lin).double() + layer.delta_weight().double()
    torch.testing.assert_close(w0 + ad.scaling * b @ a, effective, rtol=1e-5, atol=1e-5)


# ----- merge_and_unload + save_pretrained: a plain HF model, no nlora inside ---------------------------------------

def test_merge_and_unload_save_pretrained_gives_a_plain_model(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    original = tiny_llama()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init="nystrom-pinv", train="middle", seed=0, trainable=["model.norm"])
    fake_training(model)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        y = model(ids).logits
    nlora.merge_and_unload(model)
    assert not any("nlora" in type(m).__module__ for m in model.modules())
    model.save_pretrained(tmp_path / "plain")
    files = sorted(os.listdir(tmp_path / "plain"))
    assert "config.json" in files and "model.safetensors" in files
    text = (tmp_path / "plain" / "config.json").read_text()
    assert "nlora" not in text.lower() and "lora" not in text.lower()
    keys = set(load_file(tmp_path / "plain" / "model.safetensors"))
    assert keys <= set(original.state_dict()) and not any("adapters" in k or ".base." in k for k in keys)
    monkeypatch.setitem(sys.modules, "nlora", None)  # any import of nlora from here on would fail
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(reloaded) is type(original)
    with torch.no_grad():
        out = reloaded(ids).logits
        torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)
        assert torch.equal(out, model(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("init,train", [("nystrom-pinv", "middle"), ("pissa", "all"), ("lora", "all")])
def test_cuda_export_matches_nlora(tmp_path, init, train):
    pytest.importorskip("peft")
    original = tiny_llama().cuda()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init=init, train=train, seed=0)
    fake_training(model)
    nlora.export_peft(model, tmp_path / "p")
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    ids = torch.randint(0, 64, (2, 10), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


# -- import_peft: PEFT LoRA directories in ---------------------------------------------------------------------------
def peft_trained(base, path, safe=True, **lora):
    """A real PEFT LoRA on ``base`` with random B (so the delta is not zero), saved to ``path``; the PeftModel."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(path), safe_serialization=safe)
    return model


@pytest.mark.parametrize("case", ["llama-list-patterns", "llama-regex-bin", "gpt2-conv1d", "bert-modules-to-save"])
def test_import_peft_gives_peft_outputs(tmp_path, case):
    from .model_zoo import MODELS

    spec = MODELS[case.split("-")[0]]
    base = spec.model()
    lora = {"llama-list-patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"down_proj": 2},
                                        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
                                        lora_dropout=0.1),
            "llama-regex-bin": dict(r=3, lora_alpha=5, target_modules=r".*\.(k_proj|o_proj|up_proj)"),
            "gpt2-conv1d": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
            "bert-modules-to-save": dict(r=2, lora_alpha=4, target_modules=["query", "value"],
                                         modules_to_save=["classifier"])}[case]
    peft_model = peft_trained(base, tmp_path, safe=case != "llama-regex-bin", **lora)
    inputs = spec.inputs(torch.Generator().manual_seed(0))
    want = spec.run(peft_model, inputs)
    model = nlora.import_peft(spec.model(), tmp_path, adapter="imported")
    torch.testing.assert_close(spec.run(model, inputs), want, rtol=1e-5, atol=1e-5)
    peft_names = {n.rsplit(".", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert {f"base_model.model.{n}" for n in nlora.adapter_layers(model)} == peft_names
    if case == "bert-modules-to-save":
        assert nlora.model.trainable_module_names(model) == ["classifier"]
        assert model.classifier.weight.requires_grad


def test_export_then_import_peft_round_trips(tmp_path):
    model = tiny_llama()
    nlora.inject(model, "all-linear", rank=4, init="nystrom", preserve_output=True)
    fake_training(model)
    x = torch.randint(0, 64, (2, 6))
    want = model(x).logits
    nlora.export_peft(model, tmp_path)
    back = nlora.import_peft(tiny_llama(), tmp_path)
    torch.testing.assert_close(back(x).logits, want, rtol=1e-5, atol=1e-5)
    assert {a.config.init for layer in nlora.adapter_layers(back).values() for a in layer.adapters.values()} == \
        {"lora"}


def test_import_peft_refuses_embedding_loras_merged_models_and_saved_weights_of_adapted_layers(tmp_path):
    """Each refusal names the problem and leaves the model as it was (no adapter added, no weight written)."""
    from .model_zoo import MODELS

    spec = MODELS["llama"]
    peft_trained(spec.model(), tmp_path / "emb", target_modules=["embed_tokens", "q_proj"], r=2)
    peft_trained(spec.model(), tmp_path / "head", target_modules=["q_proj"], r=2, modules_to_save=["lm_head"])
    merged = spec.model()
    nlora.inject(merged, ["v_proj"], rank=2, init="slora", adapter="mine")
    nlora.merge(merged)
    wrapped_head = nlora.inject(spec.model(), ["lm_head"], rank=2, init="lora", adapter="mine")
    for model, path, match in ((spec.model(), "emb", r"layer type nlora does not adapt: .*lora_embedding_A"),
                               (merged, "emb", r"model has merged adapters"),
                               (wrapped_head, "head", r"modules_to_save weight .* in a layer nlora adapts: "
                                                      r"lm_head\.weight")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        names = nlora.adapter_names(model)
        with pytest.raises(ValueError, match=match):
            nlora.import_peft(model, tmp_path / path, adapter="imp")
        assert nlora.adapter_names(model) == names
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_import_peft_refuses_a_model_on_the_meta_device(tmp_path):
    """Factors put on meta layers would be lost to ``to_empty``: refused, nothing changed."""
    source = nn.Sequential(nn.Linear(6, 4))
    nlora.inject(source, ["0"], rank=2, init="slora", seed=0)
    nlora.export_peft(source, tmp_path / "peft")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"layer on the meta device: 0 -> materialise the model"):
        nlora.import_peft(model, tmp_path / "peft")
    assert type(model[0]) is nn.Linear


def test_import_peft_refuses_incomplete_directories_misfitting_shapes_and_taken_names(tmp_path):
    from .model_zoo import MODELS

    spec = MODELS["llama"]
    path = tmp_path / "p"
    peft_trained(spec.model(), path, target_modules=["q_proj"], r=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"has no adapter_config\.json: not a PEFT adapter directory"):
        nlora.import_peft(spec.model(), empty)
    (empty / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"has no adapter_model\.safetensors or adapter_model\.bin"):
        nlora.import_peft(spec.model(), empty)
    taken = nlora.inject(spec.model(), ["q_proj"], rank=2, init="lora", adapter="imp")
    with pytest.raises(ValueError, match=r"already holds an adapter of that name: "
                                         r"model\.layers\.0\.self_attn\.q_proj"):
        nlora.import_peft(taken, path, adapter="imp")
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith(".lora_A.weight"))
    tensors[key] = torch.zeros(2, 7)  # does not fit the layer's in_features
    wider = tmp_path / "wider"
    wider.mkdir()
    (wider / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    save_file(tensors, wider / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"lora_A/lora_B shapes do not fit the layer"):
        nlora.import_peft(spec.model(), wider)
    save_file({"base_model.model.model.norm.weight": torch.ones(32)}, wider / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no lora_A / lora_B tensors"):
        nlora.import_peft(spec.model(), wider)


@pytest.mark.parametrize("name", [("default",), ["default"]], ids=["tuple", "list"])
def test_export_peft_refuses_an_adapter_name_the_model_does_not_hold_even_if_not_a_string(name, tmp_path):
    """export_peft(adapter=name): the usual 'no adapter named' ValueError (b79a82d), not an IndexError."""
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="lora")
    with pytest.raises(ValueError, match=r"no adapter named [\(\[]'default',?[\)\]]; the model has \['default'\]"):
        nlora.export_peft(model, tmp_path / "p", adapter=name)
    assert not (tmp_path / "p").exists()
