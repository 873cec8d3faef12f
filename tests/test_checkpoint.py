"""Native adapter files (nlora.save_adapter / load_adapter): bit-exact round trips, compact IntTune storage, strict
all-or-nothing loading (every refusal names the modules and changes nothing), and per-file atomic writes.

Export to PEFT is in test_peft.py; it imports the model builders and helpers defined here.
"""

import copy
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import nlora
import nlora.checkpoint as ckpt
from nlora.model import adapter_layers

from .conftest import assert_same_state, state_hash

# non-preserving data-driven inits (nystrom-pinv with preserve_output=False) warn that they move the outputs: known here
pytestmark = pytest.mark.filterwarnings("ignore:init '.*' keeps the base weights:UserWarning")

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
FACTOR_KEYS = {"lora_A", "lora_B", "init_A", "init_B"}

CASE_IDS = [f"{i}-{t}-{p}-{'_'.join(o)}" for i, t, p, o in CASES]


# ----- models and helpers (test_peft.py uses them too) -------------------------------------------------------------

def make_mlp(seed=0):
    torch.manual_seed(seed)
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


def adapter_tensors(model):
    """Every adapter's config, its current factors (A and B read from the base where the adapter does) and its
    non-persistent buffers, which state_dict does not show."""
    out = {}
    for name, layer in adapter_layers(model).items():
        for an, ad in layer.adapters.items():
            out[f"{name}.{an}.config"] = ad.config
            out[f"{name}.{an}.reads_base"] = ad.reads_base
            for key, t in zip(("A", "N", "B"), ad.factors(layer.weight)):
                out[f"{name}.{an}.factor_{key}"] = t
            for b in ("init_A", "init_N", "init_B", "rows", "cols"):
                out[f"{name}.{an}.{b}"] = getattr(ad, b)
    return out


def assert_same_model(trained, loaded, *inputs):
    """Bit-identical state (base weights included), adapter factors and buffers, trainable flags and outputs."""
    assert_same_state(state_hash(trained), loaded)
    a, b = adapter_tensors(trained), adapter_tensors(loaded)
    assert a.keys() == b.keys()
    for k in a:
        if not isinstance(a[k], torch.Tensor):
            assert a[k] == b[k], k
            continue
        assert isinstance(b[k], torch.Tensor), k
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == \
           {n for n, p in loaded.named_parameters() if p.requires_grad}
    with torch.no_grad():
        ya, yb = trained(*inputs), loaded(*inputs)
    ya, yb = getattr(ya, "logits", ya), getattr(yb, "logits", yb)
    assert torch.equal(ya, yb)


def stored_keys(path):
    return {m: set(r["stored"]) for m, r in nlora.read_adapter_config(path)["modules"].items()}


def tensor_file(path):
    return Path(path) / ckpt.TENSOR_NAME


def snapshot(path):
    """Every file of a directory, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def round_trip(original, model, tmp_path, **save_kwargs):
    """Save ``model``'s adapter, load it into a fresh copy of ``original``; returns that copy."""
    nlora.save_adapter(model, tmp_path / "a", **save_kwargs)
    fresh = copy.deepcopy(original)
    nlora.load_adapter(fresh, tmp_path / "a")
    return fresh


# ----- round trips are bit-exact ------------------------------------------------------------------------------------

@pytest.mark.parametrize("init,train,preserve,options", CASES, ids=CASE_IDS)
def test_mlp_round_trip_is_bit_exact(tmp_path, init, train, preserve, options):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2", "4"], rank=4, alpha=6, init=init, train=train, preserve_output=preserve,
                 seed=3, rank_pattern={"4": 2}, **options)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)
    assert_same_model(model, fresh, torch.randn(9, 24))
    if init.startswith("nystrom") and train == "middle":  # compact: A and B come back from the base weight
        assert all(not FACTOR_KEYS & k for k in stored_keys(tmp_path / "a").values())


@pytest.mark.parametrize("init,train,preserve,options", CASES, ids=CASE_IDS)
def test_llama_round_trip_is_bit_exact(tmp_path, init, train, preserve, options):
    original = tiny_llama()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init=init, train=train, preserve_output=preserve, seed=0,
                 rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16}, trainable=["model.norm"], **options)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)
    assert fresh.model.norm.weight.requires_grad and getattr(fresh.model.norm, "_nlora_trainable", False)
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10)))


def test_gpt2_conv1d_round_trip_is_bit_exact(tmp_path):
    original = tiny_gpt2()
    model = copy.deepcopy(original)
    nlora.inject(model, ["c_attn", "c_proj", "c_fc"], rank=4, init="nystrom-pinv", train="middle", seed=0)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10)))
    assert {r["kind"] for r in nlora.read_adapter_config(tmp_path / "a")["modules"].values()} == {"Conv1D"}


@pytest.mark.parametrize("init,train", [("nystrom-pinv", "middle"), ("pissa", "all"), ("nystrom", "middle"),
                                        ("slora", "all")])
def test_bf16_base_with_fp32_adapters_round_trip_is_bit_exact(tmp_path, init, train):
    original = tiny_llama(torch.bfloat16)
    model = copy.deepcopy(original)
    nlora.inject(model, ["q_proj", "v_proj", "down_proj"], rank=4, init=init, train=train, seed=0)
    assert model.model.layers[0].self_attn.q_proj.lora_N.dtype == torch.float32
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10)))


def test_bf16_adapter_dtype_round_trip_is_bit_exact(tmp_path):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="slora", adapter_dtype=torch.bfloat16, compute_dtype=torch.float32)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)
    config = fresh[0].adapters["default"].config
    assert fresh[0].lora_N.dtype == torch.bfloat16
    assert (config.adapter_dtype, config.compute_dtype) == (torch.bfloat16, torch.float32)
    assert_same_model(model, fresh, torch.randn(3, 24))


def test_bf16_adapter_dtype_compact_inttune_round_trip_is_bit_exact(tmp_path):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom-pinv", train="middle", adapter_dtype=torch.bfloat16,
                 compute_dtype=torch.float32)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)  # the slices are checked at the adapter dtype (bf16)
    assert fresh[0].lora_N.dtype == torch.bfloat16
    assert all(not FACTOR_KEYS & k for k in stored_keys(tmp_path / "a").values())
    assert_same_model(model, fresh, torch.randn(3, 24))


@given(out_f=st.integers(1, 20), in_f=st.integers(1, 20), r=st.integers(1, 6), seed=st.integers(0, 2**16),
       init=st.sampled_from(["lora", "gaussian", "slora", "nystrom", "nystrom-pinv", "nystrom-optimal", "pissa"]),
       middle=st.booleans(), preserve=st.sampled_from([None, True, False]),
       index=st.sampled_from(["first", "random", "norm"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       trained=st.booleans())
def test_round_trip_property(out_f, in_f, r, seed, init, middle, preserve, index, dtype, trained):
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
        fresh = round_trip(original, model, Path(tmp))
        compact = not (stored_keys(Path(tmp) / "a")["0"] & FACTOR_KEYS)
    assert_same_model(model, fresh, torch.randn(3, in_f).to(dtype))
    if init.startswith("nystrom") and train == "middle":
        assert compact


# ----- several named adapters ---------------------------------------------------------------------------------------

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
    # "a" alone loads anywhere (and can be renamed); "b" was attached on top of a's rewritten base weight of "0"
    only_a = copy.deepcopy(original)
    nlora.load_adapter(only_a, tmp_path / "a", adapter="renamed")
    assert nlora.adapter_names(only_a) == ["renamed"]
    only_b = copy.deepcopy(original)
    before = state_hash(only_b)
    with pytest.raises(ValueError, match=r"base weight differs[^\n]*: 0 -> "):
        nlora.load_adapter(only_b, tmp_path / "b")
    assert_same_state(before, only_b)


# ----- compact IntTune storage --------------------------------------------------------------------------------------

def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(192, 256), nn.GELU(), nn.Linear(256, 192))


def tensor_file_size(path):
    return tensor_file(path).stat().st_size


def test_compact_inttune_file_is_small_and_exact(tmp_path):
    r = 8
    lora = wide_mlp()
    nlora.inject(lora, ["0", "2"], rank=r, init="lora")
    nlora.save_adapter(lora, tmp_path / "lora")
    lora_size = tensor_file_size(tmp_path / "lora")
    original = wide_mlp()
    sizes = {}
    for init in ("nystrom", "nystrom-pinv"):
        model = copy.deepcopy(original)
        nlora.inject(model, ["0", "2"], rank=r, init=init, train="middle", index="random", seed=0)
        fake_training(model)
        fresh = round_trip(original, model, tmp_path / init)
        assert_same_model(model, fresh, torch.randn(5, 192))
        sizes[init] = tensor_file_size(tmp_path / init / "a")
    # N is r*r per layer against r*(in+out) for LoRA: (192+256)/8 = 56x fewer numbers; the header, the index sets and
    # the base-weight sample take some of that back
    assert sizes["nystrom"] * 15 < lora_size
    assert sizes["nystrom-pinv"] * 8 < lora_size  # also stores N0 for the base residual
    assert stored_keys(tmp_path / "nystrom" / "a") == {m: {"lora_N", "index"} for m in ("0", "2")}
    model = copy.deepcopy(original)  # compact=False stores A and B too: as big as LoRA, and as exact
    nlora.inject(model, ["0", "2"], rank=r, init="nystrom", train="middle", index="random", seed=0)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path / "full", compact=False)
    assert_same_model(model, fresh, torch.randn(5, 192))
    assert tensor_file_size(tmp_path / "full" / "a") > lora_size
    assert stored_keys(tmp_path / "full" / "a")["0"] >= {"lora_A", "lora_N", "lora_B"}


def test_full_save_of_inttune_with_preserve_output_is_bit_exact(tmp_path):
    """Its frozen A and B are their own initial values (init_A is lora_A): safetensors must get them once each."""
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0"], rank=2, init="nystrom-pinv", train="middle")  # preserve_output by default
    fresh = round_trip(original, model, tmp_path, compact=False)
    assert_same_model(model, fresh, torch.randn(3, 24))


def test_compact_storage_keeps_trained_slices(tmp_path):
    """train='all' moves A and B off the base weight's slices: they are stored."""
    original = wide_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom", train="all", seed=0)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)
    assert stored_keys(tmp_path / "a")["0"] >= {"lora_A", "lora_B", "lora_N"}
    assert_same_model(model, fresh, torch.randn(2, 192))


def test_compact_storage_stores_slices_of_a_layer_that_another_adapter_rewrote(tmp_path):
    original = make_mlp()
    model = copy.deepcopy(original)
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom", train="middle", adapter="a", seed=0)
    nlora.inject(model, ["0"], rank=2, init="pissa", adapter="b")  # rewrites layer 0's base weight
    nlora.save_adapter(model, tmp_path / "a", adapter="a")
    keys = stored_keys(tmp_path / "a")
    assert {"lora_A", "lora_B"} <= keys["0"] and not {"lora_A", "lora_B"} & keys["2"]


def test_compact_save_of_an_adapter_moved_to_another_checkpoint_loads_back(tmp_path):
    """Its init_A/init_B are slices of the checkpoint it was trained on, not of this one: a compact save stores them."""
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init="nystrom-pinv", seed=0)  # preserve_output: init_A/B are slices
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "full", compact=False)
    other = make_mlp(seed=7)
    nlora.load_adapter(other, tmp_path / "full", check_base=False)  # on purpose, onto another checkpoint
    fresh = round_trip(make_mlp(seed=7), other, tmp_path)  # save it again (compact) and load it onto the same base
    assert {"init_A", "init_B"} <= stored_keys(tmp_path / "a")["0"]
    assert_same_model(other, fresh, torch.randn(3, 24))


# ----- another base: refused, unless asked for -----------------------------------------------------------------------

@pytest.mark.parametrize("init,train", [("nystrom", "middle"), ("nystrom-pinv", "middle"), ("lora", "all"),
                                        ("pissa", "all")])
def test_wrong_base_model_is_refused(tmp_path, init, train):
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init=init, train=train, seed=0)
    nlora.save_adapter(model, tmp_path / "a")
    other = make_mlp(seed=123)
    before = state_hash(other)
    with pytest.raises(ValueError, match=r"base weight (slices )?differ[^\n]*: 0, 2 -> load the base checkpoint"):
        nlora.load_adapter(other, tmp_path / "a")
    assert_same_state(before, other)
    assert not adapter_layers(other)


def test_check_base_false_puts_a_plain_adapter_on_another_checkpoint(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init="lora")
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    other = make_mlp(seed=7)
    with pytest.raises(ValueError, match="base weight differs"):
        nlora.load_adapter(other, tmp_path / "a")
    nlora.load_adapter(other, tmp_path / "a", check_base=False)
    assert torch.equal(other[2].lora_B, model[2].lora_B) and torch.equal(other[2].lora_A, model[2].lora_A)


def test_check_base_false_puts_a_compact_adapter_on_another_checkpoint(tmp_path):
    compact = make_mlp()
    nlora.inject(compact, ["0"], rank=4, init="nystrom", train="middle")
    nlora.save_adapter(compact, tmp_path / "c")
    other = make_mlp(seed=7)
    with pytest.raises(ValueError, match=r"base weight slices differ[^\n]*: 0 -> "):
        nlora.load_adapter(other, tmp_path / "c")
    nlora.load_adapter(other, tmp_path / "c", check_base=False)  # A and B are this checkpoint's rows and columns
    layer = other[0]
    assert torch.equal(layer.lora_A, layer.weight[:4]) and torch.equal(layer.lora_N, compact[0].lora_N)


def test_compact_adapter_saved_on_bf16_refuses_the_fp32_original(tmp_path):
    """A bf16 base's slices cannot vouch for the fp32 weights it was rounded from: only casts to LOWER precision
    of the saved base are accepted."""
    model = make_mlp().to(torch.bfloat16)
    nlora.inject(model, ["0"], rank=4, init="nystrom", train="middle")
    nlora.save_adapter(model, tmp_path / "a")
    other = make_mlp()
    before = state_hash(other)
    with pytest.raises(ValueError, match=r"base weight slices differ[^\n]*lower-precision cast"):
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


# ----- strict loading: every refusal names the modules and changes nothing ------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """An MLP adapter (nystrom-pinv, preserve_output: compact init_A/init_B) on modules 0, 2 and 4."""
    model = make_mlp()
    nlora.inject(model, ["0", "2", "4"], rank=4, init="nystrom-pinv", seed=0)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def fix_hash(path):
    """Record the tensor file's current sha256 in the config: a consistent file with other contents."""
    edit_config(path, lambda c: c.update(tensor_sha256=hashlib.sha256(tensor_file(path).read_bytes()).hexdigest()))


def edit_config(path, fn):
    file = Path(path) / ckpt.CONFIG_NAME
    cfg = json.loads(file.read_text())
    fn(cfg)
    file.write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(tensor_file(path))
    fn(tensors)
    save_file(tensors, tensor_file(path))
    fix_hash(path)


def refused(model, path, match):
    before = state_hash(model)
    structure = repr(model)
    with pytest.raises(ValueError, match=match):
        nlora.load_adapter(model, path)
    assert_same_state(before, model)
    assert repr(model) == structure


def test_saved_file_loads(saved):  # the control for the refusals below
    nlora.load_adapter(make_mlp(), saved)


def test_missing_module_is_refused(saved):
    torch.manual_seed(0)
    refused(nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16)), saved, r"missing from the model: 4 -> ")


def test_shape_mismatch_is_refused(saved):
    model = make_mlp()
    model[2] = nn.Linear(40, 17)
    refused(model, saved, r"shape mismatch[^\n]*2: saved Linear \(out, in\) = \(16, 40\), model has Linear \(17, 40\)")


def test_non_linear_module_is_refused(saved):
    model = make_mlp()
    model[2] = nn.Sequential(nn.Linear(40, 16))
    refused(model, saved, r"not a Linear/Conv1D[^\n]*2 \(Sequential\)")


def test_rank_mismatch_between_config_and_tensors_is_refused(saved):
    edit_config(saved, lambda c: c["modules"]["2"]["config"].update(rank=3))
    refused(make_mlp(), saved, r"rank/shape mismatch[^\n]*2\.\w+: \(\d+, 4\), expected \(\d+, 3\)")


def test_missing_and_extra_tensors_are_refused(saved):
    edit_tensors(saved, lambda t: t.pop("4.lora_N"))
    refused(make_mlp(), saved, r"lacks tensors the config lists: 4\.lora_N")
    edit_tensors(saved, lambda t: t.update({"4.lora_N": torch.zeros(4, 4), "4.lora_Z": torch.zeros(1)}))
    refused(make_mlp(), saved, r"does not describe: 4\.lora_Z")


def test_wrong_tensor_dtype_is_refused(saved):
    edit_tensors(saved, lambda t: t.update({"0.lora_N": t["0.lora_N"].double()}))
    refused(make_mlp(), saved, r"dtype differs[^\n]*0\.lora_N: torch.float64")


def test_invalid_index_sets_are_refused(saved):
    edit_tensors(saved, lambda t: t["2.index"].__setitem__((0, 0), 99))
    refused(make_mlp(), saved, r"invalid index sets: 2")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupted_tensor_file_is_refused(saved, damage):
    file = tensor_file(saved)
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) - 7] ^= 0x40  # one bit in the tensor data: safetensors alone would not notice
    file.write_bytes(bytes(data))
    refused(make_mlp(), saved, "corrupted or truncated")


def test_tensor_file_that_does_not_parse_is_refused(saved):
    tensor_file(saved).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    fix_hash(saved)  # the checksum matches, the contents are still garbage
    refused(make_mlp(), saved, r"could not be read")


def test_corrupted_config_is_refused(saved):
    (saved / ckpt.CONFIG_NAME).write_text('{"format": "nlora-adapter", "modu')
    refused(make_mlp(), saved, "not valid JSON")


def test_missing_files_are_refused(saved):
    tensor_file(saved).unlink()
    refused(make_mlp(), saved, r"has no adapter_model\.safetensors: the adapter directory is incomplete")
    (saved / ckpt.CONFIG_NAME).unlink()
    refused(make_mlp(), saved, r"has no adapter_config\.json: not an adapter directory")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        nlora.load_adapter(make_mlp(), saved / "nowhere")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["modules"]["0"].pop("kind"), r"invalid config entry: 0: KeyError\('kind'\)"),
    (lambda c: c["config"].pop("rank"), r"rank/shape mismatch"),  # AdapterConfig's default rank 8 does not fit
    (lambda c: c["modules"]["2"]["config"].update(init="nope"), r"invalid config entry: 2: .*unknown init 'nope'"),
    (lambda c: c["modules"]["0"]["config"].update(adapter_dtype="float99"), r"0: .*adapter_dtype='float99'"),
    (lambda c: c["modules"]["4"]["config"].update(train="sideways"), r"4: .*train='sideways'"),
    (lambda c: c["modules"]["4"].update(slice_digest=None), r"slices differ[^\n]*: 4 -> "),
    (lambda c: c["modules"]["4"].update(shape=[5]), r"4: .*kind 'Linear', shape \[5\]"),
    (lambda c: c["modules"]["4"].update(stored="lora_N"), r"4: .*tensor lists 'lora_N'.* are not a valid layer"),
    (lambda c: c.update(format_version=99), r"format_version 99; this nlora reads 2"),
    (lambda c: c.update(modules=[]), r"'modules' is missing or not a dict"),
    (lambda c: c.pop("tensor_sha256"), r"'tensor_sha256' is missing"),
    (lambda c: c.update(format="other"), r"not an nlora adapter"),
], ids=["no-kind", "default-rank-dropped", "unknown-init", "bad-dtype", "bad-train", "no-digest", "bad-shape",
        "stored-not-a-list", "version", "modules-list", "no-checksum", "other-format"])
def test_damaged_config_is_refused(saved, edit, match):
    edit_config(saved, edit)
    refused(make_mlp(), saved, match)


def test_format_version_1_file_is_refused_with_a_clear_message(saved):
    edit_config(saved, lambda c: c.update(format_version=1))
    refused(make_mlp(), saved, r"adapter_config\.json has format_version 1; this nlora reads 2: use the nlora "
                               r"version that wrote it")


def test_peft_directory_is_not_mistaken_for_a_native_adapter(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="lora")
    nlora.export_peft(model, tmp_path / "p")
    refused(make_mlp(), tmp_path / "p", "a PEFT adapter")


def test_existing_adapter_name_and_merged_model_are_refused(saved):
    model = make_mlp()
    nlora.load_adapter(model, saved)
    refused(model, saved, r"already has an adapter of that name: 0, 2, 4")
    nlora.merge(model)
    refused(model, saved, r"merged adapters")
    with pytest.raises(ValueError, match="merged"):
        nlora.save_adapter(model, saved)


# ----- writes: per-file atomic, other files kept --------------------------------------------------------------------

def two_versions(tmp_path):
    """A model whose adapter was saved to ``tmp_path/adapter`` (returned with that file's snapshot), then trained on."""
    model = make_mlp()
    nlora.inject(model, ["0", "2"], rank=4, init="slora", train="all")
    fake_training(model, seed=1)
    path = nlora.save_adapter(model, tmp_path / "adapter")
    first = make_mlp()
    nlora.load_adapter(first, path)
    fake_training(model, seed=2)
    return model, first, path


@pytest.mark.parametrize("fail_at", [1, 2], ids=["tensor-file", "config-file"])
def test_interrupted_save_never_loads_a_mix(tmp_path, monkeypatch, fail_at):
    """A save killed at either file's os.replace leaves the previous adapter or one that load_adapter refuses."""
    model, first, path = two_versions(tmp_path)
    good = snapshot(path)
    real_replace, calls = os.replace, []

    def crash(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed mid-save")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        nlora.save_adapter(model, path)
    monkeypatch.setattr(os, "replace", real_replace)
    visible = {k: v for k, v in snapshot(path).items() if not k.endswith(".tmp")}
    assert (visible == good) == (fail_at == 1)  # killed before any file was replaced, or between the two
    fresh = make_mlp()
    if visible == good:  # the crash came before the first file was replaced: the previous adapter, complete
        nlora.load_adapter(fresh, path)
        assert_same_model(first, fresh, torch.randn(2, 24))
    else:  # new tensors beside the old config: the checksum refuses the pair
        assert fail_at == 2
        refused(fresh, path, r"adapter_model\.safetensors is corrupted or truncated \(sha256 differs")
    nlora.save_adapter(model, path)  # a save that completes replaces it, and cleans up its temp files
    assert sorted(os.listdir(path)) == [ckpt.CONFIG_NAME, ckpt.TENSOR_NAME]
    again = make_mlp()
    nlora.load_adapter(again, path)
    assert_same_model(model, again, torch.randn(2, 24))


def test_save_into_a_directory_with_other_files_keeps_them(tmp_path):
    model, first, path = two_versions(tmp_path)
    (path / "model.safetensors").write_bytes(b"precious")
    (path / "notes").mkdir()
    (path / "notes" / "README.md").write_text("keep me")
    nlora.save_adapter(model, path)  # overwrite the adapter in place
    assert (path / "model.safetensors").read_bytes() == b"precious"
    assert (path / "notes" / "README.md").read_text() == "keep me"
    assert sorted(os.listdir(path)) == [ckpt.CONFIG_NAME, ckpt.TENSOR_NAME, "model.safetensors", "notes"]
    fresh = make_mlp()
    nlora.load_adapter(fresh, path)
    assert_same_model(model, fresh, torch.randn(2, 24))


def test_save_refuses_a_path_that_is_a_file(tmp_path):
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="lora")
    (tmp_path / "adapter").write_bytes(b"precious")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        nlora.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter").read_bytes() == b"precious"


# ----- devices ------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("init,train", [("nystrom-pinv", "middle"), ("pissa", "all"), ("lora", "all")])
def test_cuda_round_trip_is_bit_exact(tmp_path, init, train):
    original = tiny_llama(torch.bfloat16).cuda()
    model = copy.deepcopy(original)
    nlora.inject(model, "all-linear", rank=4, init=init, train=train, seed=0)
    fake_training(model)
    fresh = round_trip(original, model, tmp_path)
    assert fresh.model.layers[0].self_attn.q_proj.lora_A.device.type == "cuda"
    assert_same_model(model, fresh, torch.randint(0, 64, (2, 10), device="cuda"))


# -- adapter files across the base's dtype --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [dict(init="nystrom", train="middle"), dict(init="nystrom-pinv"),
                                    dict(init="nystrom-optimal", train="middle"),
                                    dict(init="nystrom", preserve_output=True)], ids=["inttune", "pinv", "optimal",
                                                                                      "preserve"])
def test_compact_file_saved_on_fp32_loads_onto_a_lower_precision_cast(tmp_path, kwargs, dtype):
    """Train in fp32, serve in bf16/fp16: compact factors are re-sliced from the cast base and compared with the
    digests of the saved slices rounded to that dtype; outputs equal the fp32 model's, cast, to rounding."""
    from .model_zoo import MODELS, fp16_supported

    spec = MODELS["llama"]
    model = spec.model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nlora.inject(model, "all-linear", rank=4, **kwargs)
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    low = nlora.load_adapter(spec.model().to(dtype), tmp_path / "a")
    if dtype == torch.float16 and not fp16_supported("llama"):
        return
    inputs = spec.inputs(torch.Generator().manual_seed(0))
    want = spec.run(copy.deepcopy(model).to(dtype), inputs).float()
    torch.testing.assert_close(spec.run(low, inputs).float(), want, rtol=0.05, atol=0.02)


def test_a_lower_precision_cast_of_another_checkpoint_is_still_refused_and_check_base_false_loads_it(tmp_path):
    from .model_zoo import MODELS

    spec = MODELS["llama"]
    model = spec.model()
    nlora.inject(model, "all-linear", rank=4, init="nystrom", train="middle")
    fake_training(model)
    nlora.save_adapter(model, tmp_path / "a")
    other = spec.model()
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 0.5  # inside the sampled rows: another checkpoint
    other = other.to(torch.bfloat16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"base weight slices differ[^\n]*: model\.layers\.1\.mlp\.up_proj -> "
                                         r"load the base checkpoint it was saved on"):
        nlora.load_adapter(other, tmp_path / "a")
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    nlora.load_adapter(other, tmp_path / "a", check_base=False)  # on purpose: A, B from this checkpoint, N from file
    layer = other.model.layers[1].mlp.up_proj
    assert torch.equal(layer.lora_A, layer.weight[:4]) and layer.lora_A[0, 0] == layer.weight[0, 0]


@pytest.mark.parametrize("name", [("default",), ["default"]], ids=["tuple", "list"])
def test_save_adapter_refuses_an_adapter_name_the_model_does_not_hold_even_if_not_a_string(name, tmp_path):
    """A tuple naming a held adapter is still no adapter name: the usual 'no adapter named' ValueError (b79a82d), not a
    StopIteration from an empty layer set."""
    model = make_mlp()
    nlora.inject(model, ["0"], rank=2, init="lora")
    with pytest.raises(ValueError, match=r"no adapter named [\(\[]'default',?[\)\]]; the model has \['default'\]"):
        nlora.save_adapter(model, tmp_path / "a", adapter=name)
    assert not (tmp_path / "a").exists()
