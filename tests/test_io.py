"""Adapter files: native save/load round trips (bit-exact), compact IntTune storage, strict all-or-nothing loading,
atomic writes, export to PEFT LoRA checked with real PEFT, and merge_and_unload + save_pretrained."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nlora
import nlora.io as nio
from nlora import NLoRALinear

from .conftest import assert_same_state, state_hash

# (init, train, preserve_output or None for the init's default, extra init options)
CASES = [
    ("lora", "all", None, {}),
    ("gaussian", "all", None, {}),
    ("slora", "all", None, {}),
    ("slora", "all", None, {"middle": "gaussian"}),
    ("nystrom", "all", None, {}),
    ("nystrom", "middle", None, {}),
    ("nystrom", "all", True, {"index": "random"}),
    ("nystrom", "middle", True, {"index": "norm"}),
    ("nystrom-pinv", "all", None, {}),
    ("nystrom-pinv", "middle", None, {"index": "random"}),
    ("nystrom-pinv", "middle", False, {}),
    ("nystrom-optimal", "all", None, {}),
    ("nystrom-optimal", "middle", None, {"index": "norm", "rcond": 1e-3}),
    ("pissa", "all", None, {}),
    ("pissa", "middle", None, {"svd": "lowrank", "niter": 2}),
]
CASE_IDS = [f"{i}-{t}-{p}-{'_'.join(o)}" for i, t, p, o in CASES]


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 5))


def tiny_llama(dtype=torch.float32, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def fake_training(model, seed=1, scale=0.05):
    """Move every trainable parameter as an optimiser step would (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * scale)


def adapter_buffers(model):
    out = {}
    for name, layer in nlora.model.adapter_layers(model).items():
        for an, ad in layer.adapters.items():
            for b in ("init_A", "init_N", "init_B", "rows", "cols"):
                out[f"{name}.{an}.{b}"] = getattr(ad, b)
    return out


def assert_same_model(trained, loaded, *inputs):
    """Bit-identical state (base weights included), adapter buffers, trainable flags and outputs."""
    assert_same_state(state_hash(trained), loaded)
    a, b = adapter_buffers(trained), adapter_buffers(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == \
           {n for n, p in loaded.named_parameters() if p.requires_grad}
    with torch.no_grad():
        ya, yb = trained(*inputs), loaded(*inputs)
    ya, yb = getattr(ya, "logits", ya), getattr(yb, "logits", yb)
    assert torch.equal(ya, yb)


def stored_keys(path):
    return {m: set(r["stored"]) for m, r in nio.read_adapter_config(path)["modules"].items()}


# ----- round trips ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init,train,preserve,options", CASES, ids=CASE_IDS)
def test_mlp_round_trip_is_bit_exact(tmp_path, init, train, preserve, options):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2", "4"], rank=4, alpha=6, init=init, train=train, preserve_output=preserve,
                 seed=3, rank_pattern={"4": 2}, **options)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert_same_model(model, fresh, torch.randn(9, 24))
    keys = stored_keys(tmp_path / "a")
    if init.startswith("nystrom") and train == "middle":  # compact: A and B come back from the base weight
        assert all(not {"lora_A", "lora_B", "init_A", "init_B"} & k for k in keys.values())


@pytest.mark.parametrize("init,train,preserve,options", CASES, ids=CASE_IDS)
def test_llama_round_trip_is_bit_exact(tmp_path, init, train, preserve, options):
    original = tiny_llama()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init=init, train=train, preserve_output=preserve, seed=0,
                 rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16}, trainable=["model.norm"], **options)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert fresh.model.norm.weight.requires_grad and getattr(fresh.model.norm, "_nlora_trainable", False)
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10)))


@pytest.mark.parametrize("init,train", [("nystrom-pinv", "middle"), ("pissa", "all"), ("nystrom", "middle"),
                                        ("slora", "all")])
def test_bf16_base_with_fp32_adapters_round_trip_bit_exact(tmp_path, init, train):
    original = tiny_llama(torch.bfloat16)
    model = copy.deepcopy(original)
    nlora.inject(model, ["q_proj", "v_proj", "down_proj"], rank=4, init=init, train=train, seed=0)
    assert model.model.layers[0].self_attn.q_proj.lora_N.dtype == torch.float32
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10)))


def test_bf16_adapter_dtype_round_trip(tmp_path):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom-pinv", train="middle", adapter_dtype=torch.bfloat16,
                 compute_dtype=torch.float32)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert fresh[0].lora_N.dtype == torch.bfloat16 and fresh[0].adapters["default"].compute_dtype == torch.float32
    assert_same_model(model, fresh, torch.randn(3, 24))


def test_gpt2_conv1d_round_trip(tmp_path):
    original = tiny_gpt2()
    model = copy.deepcopy(original)
    nlora.inject(model, ["c_attn", "c_proj", "c_fc"], rank=4, init="nystrom-pinv", train="middle", seed=0)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10)))


def test_torch_save_fallback_without_safetensors(tmp_path, monkeypatch):
    monkeypatch.setattr(nio, "_safetensors", None)
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="pissa", seed=0)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.pt"]
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert_same_model(model, fresh, torch.randn(3, 24))


def test_torch_file_is_never_fully_unpickled(tmp_path, monkeypatch):
    monkeypatch.setattr(nio, "_safetensors", None)
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="lora")
    nlora.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.pt"
    tensors = torch.load(file, weights_only=True)
    tensors["0.lora_A"] = Path("not-a-tensor")  # an arbitrary object: only a full unpickle would build it
    torch.save(tensors, file)
    _fix_hash(tmp_path / "a")
    fresh = make_mlp()
    before = state_hash(fresh)
    with pytest.raises(ValueError, match="could not be read"):
        nlora.load_adapter(fresh, tmp_path / "a")
    assert_same_state(before, fresh)


# ----- several named adapters -------------------------------------------------------------------------------

def test_named_adapters_save_and_load_per_name(tmp_path):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom-pinv", train="middle", adapter="a", seed=0)
    fake_training(model, seed=1)
    nlora.inject(model, ["0", "4"], rank=2, init="lora", adapter="b", seed=0)
    fake_training(model, seed=2)
    with pytest.raises(ValueError, match="several adapters"):
        nlora.save_adapter(model, tmp_path / "x")
    nlora.save_adapter(model, tmp_path / "a", adapter="a")
    nlora.save_adapter(model, tmp_path / "b", adapter="b")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    nlora.load_adapter(fresh, tmp_path / "b")
    x = torch.randn(4, 24)
    assert_same_model(model, fresh, x)
    nlora.set_adapter(model, "a")
    nlora.set_adapter(fresh, "a")
    assert_same_model(model, fresh, x)
    # "a" alone loads anywhere; "b" was attached on top of a's rewritten base weight of module 0
    only_a = copy.deepcopy(original)
    nlora.load_adapter(only_a, tmp_path / "a", adapter="renamed")
    assert nlora.adapter_names(only_a) == ["renamed"]
    only_b = copy.deepcopy(original)
    before = state_hash(only_b)
    with pytest.raises(ValueError, match=r"base weight differs.*\['a'\]"):
        nlora.load_adapter(only_b, tmp_path / "b")
    assert_same_state(before, only_b)


# ----- compact IntTune storage ------------------------------------------------------------------------------

def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(192, 256), nn.GELU(), nn.Linear(256, 192))


def tensor_file(path):
    return Path(path) / nio.read_adapter_config(path)["tensor_file"]


def tensor_file_size(path):
    return tensor_file(path).stat().st_size


def test_compact_inttune_file_is_small_and_exact(tmp_path):
    r = 8
    lora = wide_mlp()
    nlora.inject(lora, ["0", "2"], rank=r, init="lora")
    nlora.save_adapter(lora, tmp_path / "lora")
    original = wide_mlp()
    sizes = {}
    for init in ("nystrom", "nystrom-pinv"):
        model = copy.deepcopy(original)
        nlora.inject(model, ["0", "2"], rank=r, init=init, train="middle", index="random", seed=0)
        fake_training(model)
        nlora.save_adapter(model, tmp_path / init)
        nlora.save_adapter(model, tmp_path / f"{init}-full", compact=False)
        for mode in ("", "-full"):
            fresh = copy.deepcopy(original)
            nlora.load_adapter(fresh, tmp_path / f"{init}{mode}")
            assert_same_model(model, fresh, torch.randn(5, 192))
        sizes[init] = tensor_file_size(tmp_path / init)
        assert tensor_file_size(tmp_path / f"{init}-full") > tensor_file_size(tmp_path / "lora")
    lora_size = tensor_file_size(tmp_path / "lora")
    # N is r*r per layer against r*(in+out) for LoRA: (192+256)/8 = 56x fewer numbers; headers and the index sets
    # take some of that back (torch.save's zip container, the fallback, takes more than safetensors' header)
    st_file = tensor_file(tmp_path / "lora").suffix == ".safetensors"
    assert sizes["nystrom"] * (15 if st_file else 8) < lora_size
    assert sizes["nystrom-pinv"] * (8 if st_file else 5) < lora_size  # also stores N0 for the base residual
    assert stored_keys(tmp_path / "nystrom") == {"0": {"lora_N", "index"}, "2": {"lora_N", "index"}}


def test_compact_storage_falls_back_when_a_slice_was_trained(tmp_path):
    original = wide_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom", train="all", seed=0)
    fake_training(model)  # A and B moved: no longer slices of the base weight
    nlora.save_adapter(model, tmp_path / "a")
    assert stored_keys(tmp_path / "a")["0"] >= {"lora_A", "lora_B", "lora_N"}
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert_same_model(model, fresh, torch.randn(2, 192))


@pytest.mark.parametrize("init,match", [("nystrom", "slices differ"), ("nystrom-pinv", "slices differ"),
                                        ("lora", "base weight differs"), ("pissa", "base weight differs")])
def test_wrong_base_model_is_detected(tmp_path, init, match):
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init=init, train="middle" if init != "lora" else "all", seed=0)
    nlora.save_adapter(model, tmp_path / "a")
    torch.manual_seed(123)
    other = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 5))
    before = state_hash(other)
    with pytest.raises(ValueError, match=rf"{match}[^\n]*: 0, 2 -> load the base checkpoint"):
        nlora.load_adapter(other, tmp_path / "a")
    assert_same_state(before, other)
    assert not nlora.model.adapter_layers(other)


def test_check_base_false_puts_a_plain_adapter_on_another_checkpoint(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init="lora")
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    torch.manual_seed(7)
    other = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match="base weight differs"):
        nlora.load_adapter(other, tmp_path / "a")
    nlora.load_adapter(other, tmp_path / "a", check_base=False)
    assert torch.equal(other[2].lora_B, model[2].lora_B)
    compact = make_mlp()
    nlora.inject(compact, ["0"], rank=4, init="nystrom", train="middle")
    nlora.save_adapter(compact, tmp_path / "c")
    torch.manual_seed(7)
    other = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16), nn.GELU(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match="slices differ"):
        nlora.load_adapter(other, tmp_path / "c", check_base=False)


def test_compact_adapter_on_a_base_of_another_dtype_is_refused(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0"], rank=4, init="nystrom", train="middle")
    nlora.save_adapter(model, tmp_path / "a")
    other = make_mlp().to(torch.bfloat16)
    before = state_hash(other)
    with pytest.raises(ValueError, match="saved on a float32 base, model is bfloat16"):
        nlora.load_adapter(other, tmp_path / "a")
    assert_same_state(before, other)


def test_plain_adapter_loads_onto_the_same_base_cast_to_bf16(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init="lora")
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    other = make_mlp().to(torch.bfloat16)
    nlora.load_adapter(other, tmp_path / "a")
    assert torch.equal(other[0].lora_B, model[0].lora_B)


# ----- strict loading: every error names the modules and changes nothing -------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0", "2", "4"], rank=4, init="nystrom-pinv", seed=0)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _fix_hash(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["tensor_sha256"] = nio._sha256_file(path / cfg["tensor_file"])
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_config(path, fn):
    cfg = json.loads((path / "adapter_config.json").read_text())
    fn(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    file = tensor_file(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file, save_file
        tensors = load_file(file)
        fn(tensors)
        save_file(tensors, file)
    else:
        tensors = torch.load(file, weights_only=True)
        fn(tensors)
        torch.save(tensors, file)
    _fix_hash(path)


def _refused(model, path, match):
    before = state_hash(model)
    structure = repr(model)
    with pytest.raises(ValueError, match=match):
        nlora.load_adapter(model, path)
    assert_same_state(before, model)
    assert repr(model) == structure


def test_missing_module_is_refused(saved):
    torch.manual_seed(0)
    _refused(nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16)), saved, r"missing from the model: 4")


def test_shape_mismatch_is_refused(saved):
    model = make_mlp()
    model[2] = nn.Linear(40, 17)
    _refused(model, saved, r"shape mismatch[^\n]*2: saved Linear \(out, in\) = \(16, 40\), model has Linear \(17, 40\)")


def test_non_linear_module_is_refused(saved):
    model = make_mlp()
    model[2] = nn.Sequential(nn.Linear(40, 16))
    _refused(model, saved, r"not a Linear/Conv1D[^\n]*2 \(Sequential\)")


def test_rank_mismatch_between_config_and_tensors_is_refused(saved):
    _edit_config(saved, lambda c: c["modules"]["2"].update(rank=3))
    _refused(make_mlp(), saved, r"rank/shape mismatch[^\n]*2\.\w+: shape \(\d, 4\), expected \(\d, 3\) for rank 3")


def test_missing_and_extra_tensors_are_refused(saved):
    _edit_tensors(saved, lambda t: t.pop("4.lora_N"))
    _refused(make_mlp(), saved, r"lacks tensors the config lists: 4\.lora_N")
    _edit_tensors(saved, lambda t: t.update({"4.lora_N": torch.zeros(4, 4), "4.lora_Z": torch.zeros(1)}))
    _refused(make_mlp(), saved, r"does not describe: 4\.lora_Z")


def test_wrong_tensor_dtype_is_refused(saved):
    _edit_tensors(saved, lambda t: t.update({"0.lora_N": t["0.lora_N"].double()}))
    _refused(make_mlp(), saved, r"dtype differs[^\n]*0\.lora_N: torch.float64")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupted_tensor_file_is_refused(saved, damage):
    file = tensor_file(saved)
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) - 7] ^= 0x40  # one bit in the tensor data: safetensors alone would not notice
    file.write_bytes(bytes(data))
    _refused(make_mlp(), saved, "corrupted or truncated")


def test_corrupted_config_is_refused(saved):
    (saved / "adapter_config.json").write_text('{"format": "nlora-adapter", "modu')
    _refused(make_mlp(), saved, "not valid JSON")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["module_defaults"].pop("kind"), r"invalid config entry: 0: missing 'kind'"),
    (lambda c: c["modules"]["2"].update(init="nope"), r"invalid config entry: unknown init 'nope'"),
    (lambda c: c["modules"]["0"].update(adapter_dtype="float99"), r"0: unknown dtype 'float99'"),
    (lambda c: c["modules"]["4"].update(slice_digest=None), r"4: tensors rebuilt from the base need a slice_dig"),
    (lambda c: c["modules"]["4"].update(shape=[5]), r"4: kind 'Linear' / shape \[5\]"),
    (lambda c: c.update(format_version=99), r"format_version 99"),
    (lambda c: c.update(modules=[]), r"'modules' must be a non-empty mapping"),
], ids=["no-kind", "unknown-init", "bad-dtype", "no-digest", "bad-shape", "version", "modules-list"])
def test_damaged_config_is_refused(saved, edit, match):
    _edit_config(saved, edit)
    _refused(make_mlp(), saved, match)


def test_peft_directory_is_not_mistaken_for_a_native_adapter(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="lora")
    nlora.export_peft(model, tmp_path / "p")
    _refused(make_mlp(), tmp_path / "p", "a PEFT adapter")


def test_existing_adapter_name_and_merged_model_are_refused(saved):
    model = make_mlp()
    nlora.load_adapter(model, saved)
    _refused(model, saved, r"already has an adapter of that name: 0, 2, 4")
    nlora.merge(model)
    _refused(model, saved, r"merged adapters")
    with pytest.raises(ValueError, match="merged"):
        nlora.save_adapter(model, saved)


# ----- atomic writes ----------------------------------------------------------------------------------------

def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(nio, "_exchange", lambda a, b: False)
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init="slora", train="all")
    fake_training(model, seed=1)
    path = tmp_path / "adapter"
    nlora.save_adapter(model, path)
    good = _snapshot(path)
    fake_training(model, seed=2)
    real_write = nio._write_tensors

    def crash(tensors, file, use_st):
        real_write(tensors, file, use_st)
        with open(file, "r+b") as fh:  # a half-written file, then the process "dies"
            fh.truncate(file.stat().st_size // 2)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(nio, "_write_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        nlora.save_adapter(model, path)
    assert _snapshot(path) == good
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temp directory left behind
    fresh = make_mlp()
    nlora.load_adapter(fresh, path)  # still the first version, complete and loadable
    monkeypatch.setattr(nio, "_write_tensors", real_write)
    nlora.save_adapter(model, path)  # a save that completes replaces it
    assert _snapshot(path) != good and sorted(os.listdir(tmp_path)) == ["adapter"]
    again = make_mlp()
    nlora.load_adapter(again, path)
    assert_same_model(model, again, torch.randn(2, 24))


def test_save_refuses_to_replace_a_directory_with_other_files(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="lora")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"not part of an adapter \(\['model.safetensors'\]\)"):
        nlora.save_adapter(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path / "ckpt") == ["model.safetensors"]


# ----- export to PEFT -----------------------------------------------------------------------------------------

def peft_load(base, path):
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(base, str(path)).eval()


def close(a, b):
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


EXPORT_CASES = [("lora", "all"), ("slora", "all"), ("nystrom", "middle"), ("nystrom", "all"),
                ("nystrom-pinv", "middle"), ("nystrom-optimal", "all"), ("pissa", "all")]


@pytest.mark.parametrize("init,train", EXPORT_CASES)
def test_export_peft_mlp_matches_nlora(tmp_path, init, train):
    pytest.importorskip("peft")
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2", "4"], rank=4, alpha=6, init=init, train=train, seed=0, rank_pattern={"4": 2},
                 alpha_pattern={"2": 3})
    fake_training(model)
    nlora.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    k = 2 if model[0].adapters["default"].preserve_output else 1
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["0", "2", "4"]
    assert (cfg["r"], cfg["lora_alpha"]) == (4 * k, 6 * k)
    assert cfg["rank_pattern"] == {"4": 2 * k} and cfg["alpha_pattern"] == {"2": 3 * k}
    from safetensors.torch import load_file
    keys = sorted(load_file(tmp_path / "p" / "adapter_model.safetensors"))
    assert keys == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in "024" for x in "AB")
    x = torch.randn(6, 24)
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    with torch.no_grad():
        close(model(x), pm(x))


def test_export_peft_without_safetensors_writes_a_bin_peft_reads(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=3, init="nystrom-pinv", train="middle", seed=0)
    fake_training(model)
    monkeypatch.setattr(nio, "_safetensors", None)
    nlora.export_peft(model, tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == ["adapter_config.json", "adapter_model.bin"]
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    x = torch.randn(4, 24)
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
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
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
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    pm = peft_load(copy.deepcopy(original), tmp_path / "p")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        close(model(ids), pm(ids))


def test_export_after_load_uses_the_restored_initial_factors(tmp_path):
    pytest.importorskip("peft")
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom-optimal", train="middle", seed=0)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    nlora.export_peft(model, tmp_path / "p1")
    nlora.export_peft(fresh, tmp_path / "p2")
    assert _snapshot(tmp_path / "p1") == _snapshot(tmp_path / "p2")


def test_export_uses_a_regex_when_a_name_list_would_match_too_much(tmp_path):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))  # "0" and "1.0"
    model = copy.deepcopy(original)
    nlora.inject(model, r"0", rank=2, init="slora", seed=0)
    fake_training(model)
    nlora.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == "(0)"
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
    pattern = nio._patterns(values, 8, "rank")
    for name, v in values.items():
        assert pattern.get(other.get_pattern_key(list(pattern), name), 8) == v, name


@given(out_f=st.integers(2, 12), in_f=st.integers(2, 12), r=st.integers(1, 4), seed=st.integers(0, 2**16),
       init=st.sampled_from(["lora", "slora", "nystrom", "nystrom-pinv", "pissa"]), preserve=st.booleans())
def test_peft_factors_are_the_delta_from_the_original_weight(out_f, in_f, r, seed, init, preserve):
    r = min(r, out_f, in_f)
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).double().float()
    w0 = lin.weight.detach().double().clone()
    preserve = True if init == "pissa" else preserve
    layer = NLoRALinear(lin, rank=r, alpha=2.0 * r, init=init, preserve_output=preserve,
                        generator=torch.Generator().manual_seed(seed))
    fake_training(layer, seed=seed, scale=0.3)
    ad = layer.adapters["default"]
    a, b = nio._peft_factors(ad, torch.float64)
    assert a.shape[0] == r * (2 if ad.preserve_output else 1)
    # the exported LoRA on the ORIGINAL weight gives the adapted layer's effective weight
    effective = nlora.layer.weight_view(lin).double() + ad.delta_weight().double()
    torch.testing.assert_close(w0 + ad.scaling * b @ a, effective, rtol=1e-5, atol=1e-5)


# ----- merge_and_unload + save_pretrained: a plain HF model, no nlora inside ----------------------------------

def test_merge_and_unload_save_pretrained_gives_a_plain_model(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    original = tiny_llama()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init="nystrom-pinv", train="middle", seed=0, trainable=["model.norm"])
    fake_training(model)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        y = model(ids).logits
    nlora.merge_and_unload(model)
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


def test_initial_slices_that_do_not_match_the_base_are_stored_in_full(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom-pinv", train="middle", seed=0)
    with torch.no_grad():
        model[0].adapters["default"].init_A.add_(0.01)  # no longer a slice of the weight it was attached to
    nlora.save_adapter(model, tmp_path / "a")
    keys = stored_keys(tmp_path / "a")
    assert {"init_A", "init_B", "lora_A", "lora_B"} <= keys["0"]
    assert not {"init_A", "init_B", "lora_A", "lora_B"} & keys["2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("init,train", [("nystrom-pinv", "middle"), ("pissa", "all"), ("lora", "all")])
def test_cuda_round_trip_and_export(tmp_path, init, train):
    original = tiny_llama(torch.bfloat16).cuda()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init=init, train=train, seed=0)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    assert fresh.model.layers[0].self_attn.q_proj.lora_A.device.type == "cuda"
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10), device="cuda"))
    pytest.importorskip("peft")
    float_model = copy.deepcopy(original).float()
    nlora.inject(float_model, "all-linear", rank=4, init=init, train=train, seed=0)
    fake_training(float_model)
    nlora.export_peft(float_model, tmp_path / "p")
    pm = peft_load(copy.deepcopy(original).float(), tmp_path / "p")
    ids = torch.randint(0, 64, (2, 10), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, float_model(ids).logits, rtol=1e-4, atol=1e-4)


@given(out_f=st.integers(1, 20), in_f=st.integers(1, 20), r=st.integers(1, 6), seed=st.integers(0, 2**16),
       init=st.sampled_from(["lora", "gaussian", "slora", "nystrom", "nystrom-pinv", "nystrom-optimal", "pissa"]),
       middle=st.booleans(), preserve=st.sampled_from([None, True, False]),
       index=st.sampled_from(["first", "random", "norm"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       trained=st.booleans())
def test_round_trip_property(out_f, in_f, r, seed, init, middle, preserve, index, dtype, trained):
    import tempfile

    spec = nlora.get_init(init)
    r = min(r, out_f, in_f)
    train = "middle" if middle and spec.has_middle and not spec.zero_delta else "all"
    preserve = True if spec.preserve_fixed else preserve
    options = {"index": index} if init.startswith("nystrom") else {}
    torch.manual_seed(seed)
    original = nn.Sequential(nn.Linear(in_f, out_f)).to(dtype)
    model = copy.deepcopy(original)
    nlora.inject(model, ["0"], rank=r, init=init, train=train, preserve_output=preserve, seed=seed, **options)
    if trained:
        fake_training(model, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        nlora.save_adapter(model, Path(tmp) / "a")
        fresh = copy.deepcopy(original)
        nlora.load_adapter(fresh, Path(tmp) / "a")
        compact = not (stored_keys(Path(tmp) / "a")["0"] & {"lora_A", "lora_B", "init_A", "init_B"})
    assert_same_model(model, fresh, torch.randn(3, in_f).to(dtype))
    if init.startswith("nystrom") and train == "middle":
        assert compact
