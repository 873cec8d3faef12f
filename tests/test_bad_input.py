"""Bad input (issue 8's table): each row raises a clear error that names the module and the fix, and leaves the
model bit-identical (checked with a bitwise hash of its state_dict). README.md holds the same table
for the README; ``test_every_row_is_in_the_readme_table`` keeps the two in step.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import nlora
from .conftest import assert_same_state, state_hash
from .model_zoo import MLP, MODELS, one_thread  # noqa: F401 (autouse fixture)
from nlora import NLoRALinear


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()  # layers.0.fc (40 x 24), layers.1.fc (16 x 40), head (5 x 16)


def with_weight(name: str, fill: Callable[[torch.Tensor], None]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = mlp()
        with torch.no_grad():
            fill(model.get_submodule(name).weight)
        return model
    return build


def int8_mlp() -> nn.Module:
    model = mlp()
    w = model.layers[1].fc.weight
    model.layers[1].fc.weight = nn.Parameter((w * 100).round().to(torch.int8), requires_grad=False)
    return model


def fp8_mlp() -> nn.Module:
    model = mlp()
    model.layers[1].fc.weight = nn.Parameter(model.layers[1].fc.weight.detach().to(torch.float8_e4m3fn),
                                             requires_grad=False)
    return model


def meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return MLP()


def injected(**kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = mlp()
        nlora.inject(model, ["fc"], rank=4, init="slora", **kwargs)
        return model
    return build


def merged() -> nn.Module:
    model = injected()()
    with torch.no_grad():
        model.layers[0].fc.lora_B.normal_()
    nlora.merge(model)
    return model


def two_adapters() -> nn.Module:
    model = injected()()
    nlora.inject(model, ["fc"], rank=2, init="nystrom", adapter="other")
    return model


def ill_conditioned() -> nn.Module:
    """A second Nyström-pinv adapter on a preserve_output residual samples a core that is ~0 (the exact-truncation
    Eq. 6 reproduced it; the default ridge core only approaches the sampled block)."""
    model = mlp()
    nlora.inject(model, ["fc"], rank=4, init="nystrom-pinv", solver="svd")
    return model


@dataclass(frozen=True)
class Bad:
    id: str
    build: Callable[[], nn.Module]
    call: Callable[[nn.Module], object]
    error: type[Exception]
    match: str  # must name the module (where one is at fault) and say what to do


def inj(targets=("fc",), **kwargs) -> Callable[[nn.Module], object]:
    kwargs.setdefault("rank", 4)
    return lambda model: nlora.inject(model, list(targets) if not isinstance(targets, str) else targets, **kwargs)


ROWS = [
    Bad("rank_zero", mlp, inj(rank=0), ValueError, r"layers\.0\.fc: rank=0 must be an int in 1\.\.min\(out, in\) = 1\.\.24.*lower it or use rank_pattern"),
    Bad("rank_negative", mlp, inj(rank=-3), ValueError, r"layers\.0\.fc: rank=-3 must be an int"),
    Bad("rank_above_min_out_in", mlp, inj(rank=17), ValueError, r"layers\.1\.fc: rank=17 .*1\.\.16 for this \(16, 40\) layer"),
    Bad("rank_pattern_too_large", mlp, inj(rank=2, rank_pattern={r"layers\.1\.fc": 41}), ValueError, r"layers\.1\.fc: rank=41"),
    Bad("rank_not_int", mlp, inj(rank=2.0), ValueError, r"layers\.0\.fc: rank=2\.0 must be an int"),
    Bad("rank_conv1d_above_min", lambda: MODELS["gpt2"].model(), inj(["c_attn"], rank=33), ValueError,
        r"transformer\.h\.0\.attn\.c_attn: rank=33 .*1\.\.32 for this \(96, 32\) layer"),
    Bad("targets_match_nothing", mlp, inj(["q_proj"]), ValueError,
        r"targets=\['q_proj'\] .*matched no module of MLP; its linear modules include: layers\.0\.fc, layers\.1\.fc, head"),
    Bad("regex_matches_nothing", mlp, inj(r"layers\.\d+\.proj"), ValueError, r"matched no module of MLP"),
    Bad("targets_wrong_type", mlp, inj([]), TypeError, r"targets must be a regex string, 'all-linear' or a non-empty list"),
    Bad("non_linear_target", mlp, inj(["layers"]), TypeError,
        r"matched modules nlora cannot adapt: layers \(ModuleList\); only nn\.Linear and HF Conv1D .*name their Linear sub-modules"),
    Bad("embedding_target", lambda: MODELS["gpt2"].model(), inj(["wte"]), TypeError, r"transformer\.wte \(Embedding\)"),
    Bad("inject_twice_same_name", injected(), inj(), ValueError,
        r"layers\.0\.fc: already has an adapter named 'default'; pass adapter='<new name>' to add another, or delete_adapter first"),
    Bad("unknown_init", mlp, inj(init="nyström"), ValueError, r"unknown init 'nyström'; choose one of \[.*'nystrom'"),
    Bad("unknown_init_option", mlp, inj(init="nystrom", rcond=0.1), ValueError,
        r"init 'nystrom' has no option\(s\) \['rcond'\]; it accepts \['index'\]"),
    Bad("bad_index_method", mlp, inj(init="nystrom-optimal", index="top"), ValueError, r"index='top': choose one of"),
    Bad("bad_slora_middle", mlp, inj(init="slora", middle="orthogonal"), ValueError, r"middle='orthogonal': choose"),
    Bad("bad_pissa_svd", mlp, inj(init="pissa", svd="qr"), ValueError, r"svd='qr': choose 'full' or 'lowrank'"),
    Bad("unknown_train_mode", mlp, inj(train="n"), ValueError, r"train='n': choose 'all'.*or 'middle'"),
    Bad("inttune_without_middle", mlp, inj(init="lora", train="middle"), ValueError, r"init 'lora' has no middle matrix"),
    Bad("inttune_with_zero_b", mlp, inj(init="slora", train="middle"), ValueError,
        r"init 'slora' sets B = 0, so N would never get a gradient; use a data-driven init"),
    Bad("pissa_without_preserve", mlp, inj(init="pissa", preserve_output=False), ValueError,
        r"'pissa' always rewrites the base weight.*drop preserve_output=False"),
    Bad("dropout_out_of_range", mlp, inj(dropout=1.0), ValueError, r"dropout=1\.0 must be in \[0, 1\)"),
    Bad("alpha_not_finite", mlp, inj(alpha=float("nan")), ValueError, r"layers\.0\.fc: alpha=nan must be a finite number"),
    Bad("nan_weight_data_driven", with_weight("layers.1.fc", lambda w: w.__setitem__((3, 5), float("nan"))),
        inj(init="nystrom"), ValueError,
        r"layers\.1\.fc: weight has NaN/Inf, so the data-driven init 'nystrom' cannot use it; fix the checkpoint"),
    Bad("inf_weight_data_driven", with_weight("layers.0.fc", lambda w: w.__setitem__((0, 0), float("inf"))),
        inj(init="pissa"), ValueError, r"layers\.0\.fc: weight has NaN/Inf.*'pissa'"),
    Bad("int8_weight", int8_mlp, inj(init="lora"), TypeError,
        r"layers\.1\.fc: weight dtype torch\.int8 is not a 16/32/64-bit float.*dequantise the model first"),
    Bad("fp8_weight", fp8_mlp, inj(init="nystrom"), TypeError, r"layers\.1\.fc: weight dtype torch\.float8_e4m3fn .*dequantise"),
    Bad("meta_weights_initialised_too_early", lambda: nlora.inject(meta_mlp(), ["fc"], rank=4, init="nystrom"),
        lambda m: nlora.initialize_adapters(m), ValueError,
        r"layers\.0\.fc: .*meta.*model\.to_empty\(device=\.\.\.\) and load the base weights before initialize_adapters"),
    Bad("pending_adapter_forward", lambda: nlora.inject(meta_mlp(), ["fc"], rank=4, init="nystrom"),
        lambda m: m(torch.zeros(1, 24, device="meta")), RuntimeError, r"meta device and has no values yet.*initialize_adapters"),
    Bad("factors_overflow_adapter_dtype", ill_conditioned, inj(rank=2, init="nystrom-pinv", adapter="second",
                                                               adapter_dtype=torch.float16), ValueError,
        r"layers\.\d\.fc: init 'nystrom-pinv' gives lora_N values that are not finite in torch\.float16.*adapter_dtype=torch\.float32"),
    Bad("inject_while_merged", merged, inj(adapter="new"), ValueError, r"adapters are merged in \['layers\.0\.fc', 'layers\.1\.fc'\]; call nlora\.unmerge"),
    Bad("trainable_matches_nothing", mlp, inj(trainable=["classifier"]), ValueError, r"\['classifier'\] matched no module of MLP"),
    Bad("set_unknown_adapter", two_adapters, lambda m: nlora.set_adapter(m, ["default", "othr"]), ValueError,
        r"no adapter named \['othr'\]; the model has \['default', 'other'\]"),
    Bad("delete_unknown_adapter", two_adapters, lambda m: nlora.delete_adapter(m, "oth"), ValueError,
        r"no adapter named 'oth'; the model has \['default', 'other'\]"),
    Bad("delete_merged_adapter", merged, lambda m: nlora.delete_adapter(m, "default"), ValueError,
        r"adapter 'default' is merged in \['layers\.0\.fc', 'layers\.1\.fc'\]; call nlora\.unmerge\(model\) before deleting"),
    Bad("switch_away_from_merged", lambda: (lambda m: (nlora.set_adapter(m, "other"), nlora.merge(m), m)[-1])(two_adapters()),
        lambda m: nlora.set_adapter(m, "default"), ValueError, r"layers\.0\.fc: adapters \['other'\] are merged; unmerge before switching"),
    Bad("no_adapters_yet", mlp, lambda m: nlora.merge(m), ValueError, r"MLP has no nlora adapters; call nlora\.inject first"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_raises_clearly_and_changes_nothing(row):
    model = row.build()
    meta = any(t.is_meta for t in model.state_dict().values())
    before = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} if meta else state_hash(model)
    wrappers = {n for n, m in model.named_modules() if isinstance(m, NLoRALinear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. meta tensors
        with pytest.raises(row.error, match=row.match):
            row.call(model)
    if meta:  # meta tensors hold no values: compare names, dtypes and shapes
        assert before == {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    else:
        assert_same_state(before, model)
    assert {n for n, m in model.named_modules() if isinstance(m, NLoRALinear)} == wrappers


# -- adapter files (nlora.load_adapter): damaged files, another model's adapter, missing or extra keys --------------
def saved(init: str = "nystrom-pinv", train: str = "all", model: Callable[[], nn.Module] = mlp,
          targets: object = ("fc",)) -> Callable[[Path], Path]:
    """Writes an adapter trained (moved) from a fresh ``model()`` under ``tmp``; returns its directory."""
    def make(tmp: Path) -> Path:
        m = model()
        nlora.inject(m, list(targets) if not isinstance(targets, str) else targets, rank=4, init=init, train=train,
                     seed=0)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        return nlora.save_adapter(m, tmp / "adapter")
    return make


def damaged(make: Callable[[Path], Path], damage: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make_damaged(tmp: Path) -> Path:
        path = make(tmp)
        damage(path)
        return path
    return make_damaged


def tensor_file(path: Path) -> Path:
    return next(f for f in path.iterdir() if f.name.startswith("adapter_model."))


def truncate(path: Path) -> None:
    f = tensor_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bit(path: Path) -> None:
    f = tensor_file(path)
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x08  # one bit of one float in the tensor data: a loader without the checksum would not notice
    f.write_bytes(bytes(data))


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrites the tensor file with ``edit`` applied and a matching checksum: a consistent file with other keys."""
    def apply(path: Path) -> None:
        f = tensor_file(path)
        st = f.suffix == ".safetensors"
        if st:
            from safetensors.torch import load_file, save_file
            tensors = load_file(f)
        else:
            tensors = torch.load(f, weights_only=True)
        edit(tensors)
        save_file(tensors, f) if st else torch.save(tensors, f)
        edit_config(lambda c: c.update(tensor_sha256=nlora.io._sha256_file(f)))(path)
    return apply


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        f = path / "adapter_config.json"
        config = json.loads(f.read_text())
        edit(config)
        f.write_text(json.dumps(config))
    return apply


def wider_mlp() -> nn.Module:
    """The same module names as ``mlp()`` with another hidden size (48 instead of 40)."""
    torch.manual_seed(0)
    model = MLP()
    model.layers[0].fc, model.layers[1].fc = nn.Linear(24, 48), nn.Linear(48, 16)
    return model


def other_checkpoint() -> nn.Module:
    torch.manual_seed(1)
    return MLP()  # the same architecture with other weights


def loaded() -> nn.Module:
    """A model that already holds the adapter ``saved()`` writes (same name "default")."""
    model = mlp()
    nlora.inject(model, ["fc"], rank=4, init="nystrom-pinv", seed=0)
    return model


def peft_export(tmp: Path) -> Path:
    m = mlp()
    nlora.inject(m, ["fc"], rank=4, init="lora")
    return nlora.export_peft(m, tmp / "adapter")


@dataclass(frozen=True)
class BadFile:
    id: str
    make: Callable[[Path], Path]  # writes the (bad) adapter directory under a tmp dir and returns it
    build: Callable[[], nn.Module]  # the model it is loaded into
    match: str  # names the file or the modules at fault, and says what to do


SAVE_AGAIN = r"the file is damaged or was edited: save the adapter again"
FILE_ROWS = [
    BadFile("truncated_adapter_file", damaged(saved(), truncate), mlp,
            r"adapter_model\.\w+ is corrupted or truncated \(sha256 differs.*\); save the adapter again"),
    BadFile("corrupted_adapter_file_one_bit", damaged(saved(), flip_bit), mlp,
            r"adapter_model\.\w+ is corrupted or truncated .*save the adapter again"),
    BadFile("corrupted_config_file",
            damaged(saved(), lambda p: (p / "adapter_config.json").write_text('{"format": "n')),
            mlp, r"adapter_config\.json is corrupted \(not valid JSON.*\); " + SAVE_AGAIN),
    BadFile("adapter_directory_without_tensor_file", damaged(saved(), lambda p: tensor_file(p).unlink()), mlp,
            r"has no adapter_model\.\w+: the adapter directory is incomplete; " + SAVE_AGAIN),
    BadFile("adapter_for_another_architecture", saved("lora", model=lambda: MODELS["gpt2"].model(), targets=["c_attn"]),
            mlp, r"missing from the model: transformer\.h\.0\.attn\.c_attn, transformer\.h\.1\.attn\.c_attn -> an "
                 r"adapter saved from another model\? load it into the model \(architecture\) it was saved from"),
    BadFile("adapter_for_other_layer_sizes", saved("lora"), wider_mlp,
            r"shape mismatch \(wrong base model\?\): layers\.0\.fc: saved Linear \(out, in\) = \(40, 24\), model has "
            r"Linear \(48, 24\).* -> load it into the base model it was trained on"),
    BadFile("adapter_for_another_checkpoint", saved("lora"), other_checkpoint,
            r"base weight differs from the one the adapter was saved on.*: layers\.0\.fc, layers\.1\.fc -> load the "
            r"base checkpoint it was trained on, or pass check_base=False"),
    BadFile("compact_adapter_for_another_checkpoint", saved("nystrom", "middle"), other_checkpoint,
            r"base weight slices differ.*: layers\.0\.fc, layers\.1\.fc -> load the base checkpoint \(and dtype\)"),
    BadFile("peft_directory_given_to_load_adapter", peft_export, mlp,
            r"adapter_config\.json is a PEFT adapter \(load it with peft\)"),
    BadFile("checkpoint_missing_keys", damaged(saved(), edit_tensors(lambda t: t.pop("layers.1.fc.lora_N"))), mlp,
            r"file lacks tensors the config lists: layers\.1\.fc\.lora_N -> " + SAVE_AGAIN),
    BadFile("checkpoint_extra_keys",
            damaged(saved(), edit_tensors(lambda t: t.update({"layers.1.fc.lora_Z": torch.zeros(2)}))),
            mlp, r"file has tensors the config does not describe: layers\.1\.fc\.lora_Z -> " + SAVE_AGAIN),
    BadFile("checkpoint_config_missing_keys", damaged(saved(), edit_config(lambda c: c["module_defaults"].pop("init"))),
            mlp, r"has an invalid config entry: layers\.0\.fc: missing 'init'.* -> " + SAVE_AGAIN),
    BadFile("checkpoint_config_extra_module", damaged(saved(), edit_config(
        lambda c: c["modules"].update({"layers.2.fc": c["modules"]["layers.1.fc"]}))), mlp,
            r"missing from the model: layers\.2\.fc -> an adapter saved from another model\?"),
    BadFile("adapter_name_already_loaded", saved(), loaded,
            r"already has an adapter of that name: layers\.0\.fc, layers\.1\.fc -> pass adapter='<new name>'"),
]


@pytest.mark.parametrize("row", FILE_ROWS, ids=[r.id for r in FILE_ROWS])
def test_bad_adapter_file_raises_clearly_and_changes_nothing(row, tmp_path):
    path = row.make(tmp_path)
    model = row.build()
    before = state_hash(model)
    structure = repr(model)  # also: no wrapper added, none removed
    with pytest.raises(ValueError, match=row.match):
        nlora.load_adapter(model, path)
    assert_same_state(before, model)
    assert repr(model) == structure


def test_errors_on_the_last_layer_leave_earlier_layers_untouched():
    """inject validates and computes every layer before it modifies any: a bad last layer changes nothing."""
    model = mlp()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"^head: weight has NaN/Inf"):
        nlora.inject(model, "all-linear", rank=4, init="pissa")  # layers.0.fc and layers.1.fc come first
    assert_same_state(before, model)


def test_random_inits_accept_nonfinite_weights():
    """Only data-driven inits read the weight; lora/slora on a NaN-holding layer are allowed (the NaN is the user's)."""
    model = with_weight("layers.0.fc", lambda w: w.__setitem__((0, 0), float("nan")))()
    nlora.inject(model, ["fc"], rank=4, init="slora")
    assert torch.isfinite(model.layers[0].fc.lora_A).all()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantised_torch_linear_is_refused_by_name():
    qlinear = pytest.importorskip("torch.ao.nn.quantized").Linear
    model = nn.Sequential(nn.Linear(8, 8), qlinear(8, 4))
    with pytest.raises(TypeError, match=r"1 \(Linear\).*dequantise quantised layers first"):
        nlora.inject(model, ["1"], rank=2)
    assert not isinstance(model[0], NLoRALinear) and type(model[1]) is qlinear


def test_every_row_is_in_the_readme_table():
    table = (Path(__file__).parents[1] / "README.md").read_text()
    listed = set(re.findall(r"`(\w+)`\s*\|\s*$", table, flags=re.M))
    assert listed == {r.id for r in ROWS} | {r.id for r in FILE_ROWS}
