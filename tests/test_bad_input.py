"""Bad input: each row raises a clear error (naming the module at fault, where one is, and the fix) and leaves the
model bit-identical (a bitwise hash of its state_dict) with no wrapper added.

docs/errors.md lists every row with an excerpt of its real message; it is generated from these rows by
``python -m tests.test_bad_input`` (run from the repository root), and ``test_docs_errors_md_is_up_to_date`` fails
when the two drift apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nlora
from nlora import NLoRALinear
from nlora.checkpoint import CONFIG_NAME, TENSOR_NAME

from .conftest import assert_same_state, state_hash
from .model_zoo import MLP, MODELS, one_thread  # noqa: F401 (autouse fixture)

DOCS = Path(__file__).parents[1] / "docs" / "errors.md"
REGENERATE = "python -m tests.test_bad_input"
EXCERPT = 150  # characters of each message shown in docs/errors.md


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()  # layers.0.fc (40 x 24), layers.1.fc (16 x 40), head (5 x 16)


def llama() -> nn.Module:
    return MODELS["llama"].model()  # model.layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, lm_head


def gpt2() -> nn.Module:
    return MODELS["gpt2"].model()


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


class Wrapped(torch.Tensor):
    """A tensor subclass, as torchao and bitsandbytes weights are."""


def wrapped_mlp() -> nn.Module:
    model = mlp()
    model.layers[1].fc.weight = nn.Parameter(model.layers[1].fc.weight.detach().as_subclass(Wrapped),
                                             requires_grad=False)
    return model


def fp8_mlp() -> nn.Module:
    model = mlp()
    model.layers[1].fc.weight = nn.Parameter(model.layers[1].fc.weight.detach().to(torch.float8_e4m3fn),
                                             requires_grad=False)
    return model


def meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return MLP()


def nf4_mlp() -> nn.Module:
    """Two bf16 Linears, (512, 256) and (256, 512), with torchao NF4 weights (4-bit)."""
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).to(torch.bfloat16)
    for i in (0, 2):
        model[i].weight = nn.Parameter(nf4.to_nf4(model[i].weight.detach()), requires_grad=False)
    return model


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nystrom without preserve_output warns that it moves the outputs
        nlora.inject(model, ["fc"], rank=2, init="nystrom", adapter="other")
    return model


def tiny_core(w: torch.Tensor) -> None:
    """A weight whose sampled 2 x 2 Nyström core (index='first') is 1e-6·I: its pseudo-inverse is 1e6·I."""
    w[:2, :2] = 1e-6 * torch.eye(2)


@dataclass(frozen=True)
class Bad:
    id: str
    what: str  # the bad input, in words (the first column of docs/errors.md)
    build: Callable[[], nn.Module]
    call: Callable[[nn.Module], object]
    error: type[Exception]
    match: str  # must name the module (where one is at fault) and say what to do


def routed(names, rows: int = 2, grad: bool = False, disabled: bool = False) -> Callable[[nn.Module], object]:
    """A forward of ``rows`` rows inside ``nlora.route(model, names)`` (``disabled``: inside disable_adapter)."""
    def call(model: nn.Module) -> None:
        with nlora.disable_adapter(model) if disabled else contextlib.nullcontext():
            with nlora.route(model, names), torch.set_grad_enabled(grad):
                model(torch.zeros(rows, 24))
    return call


def peft_import(edit: Callable[[dict], None] | None = None, source: Callable[[], nn.Module] = mlp,
                targets=("fc",)) -> Callable[[nn.Module], object]:
    """``import_peft`` of a PEFT LoRA exported from ``source()`` whose adapter_config.json ``edit`` changed."""
    def call(model: nn.Module) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            other = source()
            nlora.inject(other, list(targets), rank=2, init="lora")
            path = nlora.export_peft(other, Path(tmp) / "peft")
            if edit is not None:
                config = json.loads((path / CONFIG_NAME).read_text())
                edit(config)
                (path / CONFIG_NAME).write_text(json.dumps(config))
            nlora.import_peft(model, path)
    return call


def inj(targets=("fc",), **kwargs) -> Callable[[nn.Module], object]:
    kwargs.setdefault("rank", 4)
    return lambda model: nlora.inject(model, list(targets) if not isinstance(targets, str) else targets, **kwargs)


ROWS = [
    Bad("rank_zero", "rank <= 0", mlp, inj(rank=0), ValueError, r"^rank=0 must be a positive int$"),
    Bad("rank_negative", "rank < 0", mlp, inj(rank=-3), ValueError, r"^rank=-3 must be a positive int$"),
    Bad("rank_above_min_out_in", "rank > min(out, in) of a target", mlp, inj(rank=17), ValueError,
        r"^layers\.1\.fc: rank=17 is larger than min\(out, in\) = 16 of this \(16, 40\) layer; lower it or use "
        r"rank_pattern$"),
    Bad("rank_pattern_too_large", "rank_pattern gives one module a rank > min(out, in)", mlp,
        inj(rank=2, rank_pattern={r"layers\.1\.fc": 41}), ValueError,
        r"^layers\.1\.fc: rank=41 is larger than min\(out, in\) = 16 .*use rank_pattern$"),
    Bad("rank_pattern_zero", "rank_pattern gives one module rank 0", mlp,
        inj(["fc", "head"], rank_pattern={"head": 0}), ValueError,
        r"^head: rank=0 must be a positive int \(from rank_pattern/alpha_pattern\)$"),
    Bad("rank_not_int", "rank a float (e.g. 2.0)", mlp, inj(rank=2.0), TypeError,
        r"^rank=2\.0 must be a positive int, got float$"),
    Bad("rank_str", "rank a string (e.g. \"8\")", mlp, inj(rank="8"), TypeError,
        r"^rank='8' must be a positive int, got str$"),  # anchored: no "lower it" (it is not too large)
    Bad("rank_conv1d_above_min", "rank > min(out, in) on a GPT-2 Conv1D (read as (out, in))", gpt2,
        inj(["c_attn"], rank=33), ValueError,
        r"^transformer\.h\.0\.attn\.c_attn: rank=33 is larger than min\(out, in\) = 32 of this \(96, 32\) layer"),
    Bad("targets_match_nothing", "targets (list) match nothing", mlp, inj(["q_proj"]), ValueError,
        r"^targets=\['q_proj'\]: entries match no module of MLP: 'q_proj'; nothing was changed$"),
    Bad("targets_typo", "one entry of a targets list has a typo", llama, inj(["q_prj", "v_proj"]), ValueError,
        r"^targets=\['q_prj', 'v_proj'\]: entries match no module of LlamaForCausalLM: 'q_prj' \(did you mean "
        r"'q_proj'.*\); nothing was changed$"),
    Bad("regex_matches_nothing", "targets (regex) match nothing", mlp, inj(r"layers\.\d+\.proj"), ValueError,
        r"matched no module of MLP; its linear modules include: layers\.0\.fc, layers\.1\.fc, head$"),
    Bad("targets_wrong_type", "targets empty or not strings", mlp, inj([]), TypeError,
        r"targets must be a regex string, 'all-linear' or a non-empty list"),
    Bad("non_linear_target", "a target that is not Linear/Conv1D (a container)", mlp, inj(["layers"]), TypeError,
        r"matched modules nlora cannot adapt: layers \(ModuleList\); only nn\.Linear and HF Conv1D .*name their Linear "
        r"sub-modules"),
    Bad("embedding_target", "an Embedding target", gpt2, inj(["wte"]), TypeError, r"transformer\.wte \(Embedding\)"),
    Bad("inject_twice_same_name", "injecting twice into a module without a new adapter name", injected(), inj(),
        ValueError, r"layers\.0\.fc: already has an adapter named 'default'; pass adapter='<new name>' to add another, "
                    r"or delete_adapter first"),
    Bad("unknown_init", "unknown init name", mlp, inj(init="nyström"), ValueError,
        r"unknown init 'nyström'; choose one of \[.*'nystrom'"),
    Bad("unknown_init_option", "unknown init option", mlp, inj(init="nystrom", rcond=0.1), ValueError,
        r"init 'nystrom' has no option\(s\) \['rcond'\]; it accepts \['index'\]"),
    Bad("bad_index_method", "unknown Nyström index method", mlp, inj(init="nystrom-optimal", index="top"), ValueError,
        r"index='top': choose one of"),
    Bad("bad_slora_middle", "unknown slora middle init", mlp, inj(init="slora", middle="orthogonal"), ValueError,
        r"middle='orthogonal': choose"),
    Bad("bad_pissa_svd", "unknown pissa svd mode", mlp, inj(init="pissa", svd="qr"), ValueError,
        r"svd='qr': choose 'full' or 'lowrank'"),
    Bad("unknown_train_mode", "unknown train mode", mlp, inj(train="n"), ValueError,
        r"train='n': choose 'all'.*or 'middle'"),
    Bad("inttune_without_middle", "train='middle' with an init that has no N (lora, gaussian)", mlp,
        inj(init="lora", train="middle"), ValueError, r"init 'lora' has no middle matrix"),
    Bad("inttune_with_zero_b", "train='middle' with slora (B = 0 frozen: N never learns)", mlp,
        inj(init="slora", train="middle"), ValueError,
        r"init 'slora' sets B = 0, so N would never get a gradient; use a data-driven init"),
    Bad("pissa_without_preserve", "pissa with preserve_output=False", mlp, inj(init="pissa", preserve_output=False),
        ValueError, r"'pissa' always rewrites the base weight.*drop preserve_output=False"),
    Bad("dropout_out_of_range", "dropout outside [0, 1)", mlp, inj(dropout=1.0), ValueError,
        r"^dropout=1\.0 must be a number in \[0, 1\)$"),
    Bad("alpha_not_finite", "alpha NaN/Inf", mlp, inj(alpha=float("nan")), ValueError,
        r"^alpha=nan must be a finite number"),
    Bad("nan_weight_data_driven", "NaN base weight with a data-driven init",
        with_weight("layers.1.fc", lambda w: w.__setitem__((3, 5), float("nan"))), inj(init="nystrom"), ValueError,
        r"layers\.1\.fc: weight has NaN/Inf, so the data-driven init 'nystrom' cannot use it; fix the checkpoint"),
    Bad("inf_weight_data_driven", "Inf base weight with a data-driven init",
        with_weight("layers.0.fc", lambda w: w.__setitem__((0, 0), float("inf"))), inj(init="pissa"), ValueError,
        r"layers\.0\.fc: weight has NaN/Inf.*'pissa'"),
    Bad("int8_weight", "integer weights", int8_mlp, inj(init="lora"), TypeError,
        r"layers\.1\.fc: weight dtype torch\.int8 is not a 16/32/64-bit float.*dequantise the model first"),
    Bad("fp8_weight", "fp8 weights", fp8_mlp, inj(init="nystrom"), TypeError,
        r"layers\.1\.fc: weight dtype torch\.float8_e4m3fn .*dequantise"),
    Bad("four_bit_rank_above_min", "rank > min(out, in) of a 4-bit (NF4 / bitsandbytes) layer", nf4_mlp,
        inj(["0", "2"], rank=300), ValueError,
        r"^0: rank=300 is larger than min\(out, in\) = 256 of this \(512, 256\) layer; lower it or use rank_pattern$"),
    Bad("wrapped_weight", "a quantised or wrapped weight (a tensor subclass, e.g. torchao or bitsandbytes)",
        wrapped_mlp, inj(init="nystrom"), TypeError,
        r"^layers\.1\.fc: the weight is a Wrapped \(a quantised or wrapped tensor\), not a plain float tensor; "
        r"dequantise the layer first$"),
    Bad("meta_weights_initialised_too_early", "`initialize_adapters` before the meta model has real weights",
        lambda: nlora.inject(meta_mlp(), ["fc"], rank=4, init="nystrom"), lambda m: nlora.initialize_adapters(m),
        ValueError, r"layers\.0\.fc: .*meta.*model\.to_empty\(device=\.\.\.\) and load the base weights before "
                    r"initialize_adapters"),
    Bad("pending_adapter_merge_and_unload", "`merge_and_unload` with adapters injected on meta, not yet initialised",
        lambda: nlora.inject(meta_mlp(), ["fc"], rank=4, init="nystrom"), lambda m: nlora.merge_and_unload(m),
        ValueError, r"\['layers\.0\.fc'.*meta device .*nlora\.initialize_adapters\(model\) before merge_and_unload; "
        r"nothing was changed"),
    Bad("pending_adapter_export_peft", "`export_peft` of an adapter injected on meta, not yet initialised",
        lambda: nlora.inject(meta_mlp(), ["fc"], rank=4, init="nystrom"),
        lambda m: nlora.export_peft(m, Path(tempfile.gettempdir()) / "nlora-never-written"), ValueError,
        r"^adapter 'default' has no values yet in \['layers\.0\.fc', 'layers\.1\.fc'\] \(injected on the meta "
        r"device\); call nlora\.initialize_adapters\(model\) first$"),
    Bad("peft_import_meta_model", "`import_peft` into a model on the meta device", meta_mlp, peft_import(),
        ValueError, r"layer on the meta device: layers\.0\.fc, layers\.1\.fc -> materialise the model \(to_empty\)"),
    Bad("pending_adapter_forward", "forward through an adapter injected on meta and not yet initialised",
        lambda: nlora.inject(meta_mlp(), ["fc"], rank=4, init="nystrom"),
        lambda m: m(torch.zeros(1, 24, device="meta")), RuntimeError,
        r"meta device and has no values yet.*initialize_adapters"),
    Bad("factors_overflow_adapter_dtype",
        "init factors that overflow adapter_dtype (a Nyström-pinv core of ~0 in fp16)",
        with_weight("layers.0.fc", tiny_core), inj(rank=2, init="nystrom-pinv", adapter_dtype=torch.float16),
        ValueError, r"^layers\.0\.fc: init 'nystrom-pinv' gives factors that are not finite in torch\.float16 "
                    r".*nothing was changed\. Use adapter_dtype=torch\.float32"),
    Bad("inject_while_merged", "injecting while adapters are merged", merged, inj(adapter="new"), ValueError,
        r"adapters are merged in \['layers\.0\.fc', 'layers\.1\.fc'\]; call nlora\.unmerge"),
    Bad("trainable_matches_nothing", "trainable=[...] matches nothing", mlp, inj(trainable=["classifier"]),
        ValueError, r"^trainable=\['classifier'\]: entries match no module of MLP: 'classifier'; nothing was changed$"),
    Bad("trainable_typo", "an entry of trainable=[...] has a typo", mlp, inj(trainable=["haed"]), ValueError,
        r"^trainable=\['haed'\]: entries match no module of MLP: 'haed' \(did you mean 'head'\?\); nothing was "
        r"changed$"),
    Bad("set_unknown_adapter", "set_adapter with an unknown name", two_adapters,
        lambda m: nlora.set_adapter(m, ["default", "othr"]), ValueError,
        r"no adapter named \['othr'\]; the model has \['default', 'other'\]"),
    Bad("delete_unknown_adapter", "delete_adapter with an unknown name", two_adapters,
        lambda m: nlora.delete_adapter(m, "oth"), ValueError,
        r"no adapter named 'oth'; the model has \['default', 'other'\]"),
    Bad("delete_merged_adapter", "deleting a merged adapter", merged, lambda m: nlora.delete_adapter(m, "default"),
        ValueError, r"adapter 'default' is merged in \['layers\.0\.fc', 'layers\.1\.fc'\]; call "
                    r"nlora\.unmerge\(model\) before deleting"),
    Bad("switch_away_from_merged", "set_adapter away from a merged adapter",
        lambda: (lambda m: (nlora.set_adapter(m, "other"), nlora.merge(m), m)[-1])(two_adapters()),
        lambda m: nlora.set_adapter(m, "default"), ValueError,
        r"layers\.0\.fc: adapters \['other'\] are merged; unmerge before switching"),
    Bad("route_length_differs", "a route whose length differs from the batch", two_adapters,
        routed(["default", "other", None]), ValueError,
        r"^layers\.0\.fc: the route has 3 entries but the batch has 2 rows; pass one adapter name \(or None\) per "
        r"row$"),
    Bad("route_unknown_adapter", "a route naming an unknown adapter", two_adapters, routed(["default", "othr"]),
        ValueError, r"^route: no adapter named \['othr'\]; the model has \['default', 'other'\]$"),
    Bad("route_while_merged", "routing while adapters are merged", merged, routed(["default", None]), RuntimeError,
        r"^layers\.0\.fc: cannot route while adapters are merged, disabled \(disable_adapter\) or already routed"),
    Bad("route_inside_disable", "routing inside disable_adapter", two_adapters,
        routed(["default", None], disabled=True), RuntimeError, r"cannot route while adapters are merged, disabled"),
    Bad("route_training", "training through a route (autograd recording)", two_adapters,
        routed(["default", "other"], grad=True), RuntimeError,
        r"^layers\.0\.fc: nlora\.route is for inference; run the routed model under torch\.no_grad\(\) or "
        r"torch\.inference_mode\(\) \(to train one adapter, use set_adapter\)$"),
    Bad("peft_import_dora", "a PEFT adapter using DoRA (also rsLoRA, LoRA biases, ...)", mlp,
        peft_import(lambda c: c.update(use_dora=True)), ValueError,
        r"peft: the PEFT adapter uses DoRA \(use_dora\), which nlora does not have; nothing was changed \(retrain "
        r"without it, or load it with peft\)$"),
    Bad("peft_import_bias", "a PEFT adapter that trains biases (bias='all')", mlp,
        peft_import(lambda c: c.update(bias="all")), ValueError, r"uses bias='all', which nlora does not have"),
    Bad("peft_import_not_lora", "a PEFT adapter of another type (IA3, prefix tuning, ...)", mlp,
        peft_import(lambda c: c.update(peft_type="IA3")), ValueError,
        r"peft: peft_type 'IA3' is not LoRA; nlora imports PEFT LoRA adapters only; nothing was changed$"),
    Bad("peft_import_other_architecture", "a PEFT adapter trained on another architecture", mlp,
        peft_import(source=llama, targets=("q_proj",)), ValueError,
        r"cannot import adapter 'default' from .*peft into MLP; nothing was changed:\n  not a Linear / Conv1D of the "
        r"model: model\.layers\.0\.self_attn\.q_proj, model\.layers\.1\.self_attn\.q_proj -> an adapter for "
        r"another architecture\? import it into the model it was trained on$"),
    Bad("save_adapter_callback_without_adapters", "`nlora.hf.SaveAdapterCallback` on a model without adapters", mlp,
        lambda m: __import__("nlora.hf").hf.SaveAdapterCallback().on_train_begin(None, None, None, model=m),
        ValueError, r"^SaveAdapterCallback: MLP has no nlora adapters; call nlora\.inject \(or load_adapter\) first "
                    r"\(before building the Trainer\)$"),
    Bad("no_adapters_yet", "merge/unmerge/... on a model without adapters", mlp, lambda m: nlora.merge(m), ValueError,
        r"MLP has no nlora adapters; call nlora\.inject first"),
]


def wrappers(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, NLoRALinear)}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_raises_clearly_and_changes_nothing(row):
    model = row.build()
    meta = any(t.is_meta for t in model.state_dict().values())
    before = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} if meta else state_hash(model)
    wrapped = wrappers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. meta tensors
        with pytest.raises(row.error, match=row.match):
            row.call(model)
    if meta:  # meta tensors hold no values: compare names, dtypes and shapes
        assert before == {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    else:
        assert_same_state(before, model)
    assert wrappers(model) == wrapped
    assert all(getattr(m, "routing", None) is None for m in model.modules())  # no route left behind


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
    return path / TENSOR_NAME


def truncate(path: Path) -> None:
    f = tensor_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bit(path: Path) -> None:
    f = tensor_file(path)
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x08  # one bit of one float in the tensor data: a loader without the checksum would not notice
    f.write_bytes(bytes(data))


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        f = path / CONFIG_NAME
        config = json.loads(f.read_text())
        edit(config)
        f.write_text(json.dumps(config))
    return apply


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrites the tensor file with ``edit`` applied and a matching checksum: a consistent file with other keys."""
    def apply(path: Path) -> None:
        f = tensor_file(path)
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f)
        edit_config(lambda c: c.update(tensor_sha256=hashlib.sha256(f.read_bytes()).hexdigest()))(path)
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
    what: str  # the bad input, in words (the first column of docs/errors.md)
    make: Callable[[Path], Path]  # writes the (bad) adapter directory under a tmp dir and returns it
    build: Callable[[], nn.Module]  # the model it is loaded into
    match: str  # names the file or the modules at fault, and says what to do


SAVE_AGAIN = r"the file is damaged or was edited: save the adapter again"
FILE_ROWS = [
    BadFile("truncated_adapter_file", "a truncated adapter (tensor) file", damaged(saved(), truncate), mlp,
            r"adapter_model\.safetensors is corrupted or truncated \(sha256 differs.*\); save the adapter again"),
    BadFile("corrupted_adapter_file_one_bit", "a corrupted adapter file (one flipped bit in the tensor data)",
            damaged(saved(), flip_bit), mlp,
            r"adapter_model\.safetensors is corrupted or truncated .*save the adapter again"),
    BadFile("corrupted_config_file", "a corrupted (cut) `adapter_config.json`",
            damaged(saved(), lambda p: (p / CONFIG_NAME).write_text('{"format": "n')),
            mlp, r"adapter_config\.json is corrupted \(not valid JSON.*\); " + SAVE_AGAIN),
    BadFile("old_format_version", "a file written by the previous nlora format (format_version 1)",
            damaged(saved(), edit_config(lambda c: c.update(format_version=1))), mlp,
            r"adapter_config\.json has format_version 1; this nlora reads 2: use the nlora version that wrote it"),
    BadFile("adapter_directory_without_tensor_file", "the tensor file is missing",
            damaged(saved(), lambda p: tensor_file(p).unlink()), mlp,
            r"has no adapter_model\.safetensors: the adapter directory is incomplete; " + SAVE_AGAIN),
    BadFile("adapter_for_another_architecture", "an adapter file for another model (a GPT-2 adapter into the MLP)",
            saved("lora", model=gpt2, targets=["c_attn"]), mlp,
            r"missing from the model: transformer\.h\.0\.attn\.c_attn, transformer\.h\.1\.attn\.c_attn -> an "
            r"adapter saved from another model\? load it into the model \(architecture\) it was saved from"),
    BadFile("adapter_for_other_layer_sizes",
            "an adapter file for another model with the same module names but other sizes", saved("lora"), wider_mlp,
            r"shape mismatch \(wrong base model\?\): layers\.0\.fc: saved Linear \(out, in\) = \(40, 24\), model has "
            r"Linear \(48, 24\).* -> load it into the base model it was trained on"),
    BadFile("adapter_for_another_checkpoint", "an adapter file for another checkpoint of the same architecture",
            saved("lora"), other_checkpoint,
            r"base weight differs from the one the adapter was saved on.*: layers\.0\.fc, layers\.1\.fc -> load the "
            r"base checkpoint it was trained on, or pass check_base=False"),
    BadFile("compact_adapter_for_another_checkpoint",
            "the same, for a compact IntTune file (A, B re-sliced from the base)", saved("nystrom", "middle"),
            other_checkpoint, r"base weight slices differ from the ones saved.*: layers\.0\.fc, "
                              r"layers\.1\.fc -> load the base checkpoint it was saved on \(in its dtype or a "
                              r"lower-precision cast of it\)"),
    BadFile("peft_directory_given_to_load_adapter", "a PEFT export given to `load_adapter`", peft_export, mlp,
            r"adapter_config\.json is a PEFT adapter \(import it with nlora\.import_peft\)"),
    BadFile("checkpoint_missing_keys", "a checkpoint with a missing key (a consistent file, checksum fixed)",
            damaged(saved(), edit_tensors(lambda t: t.pop("layers.1.fc.lora_N"))), mlp,
            r"file lacks tensors the config lists: layers\.1\.fc\.lora_N -> " + SAVE_AGAIN),
    BadFile("checkpoint_extra_keys", "a checkpoint with an extra key",
            damaged(saved(), edit_tensors(lambda t: t.update({"layers.1.fc.lora_Z": torch.zeros(2)}))),
            mlp, r"file has tensors the config does not describe: layers\.1\.fc\.lora_Z -> " + SAVE_AGAIN),
    BadFile("checkpoint_config_missing_keys", "a config entry missing a key",
            damaged(saved(), edit_config(lambda c: c["modules"]["layers.0.fc"].pop("kind"))),
            mlp, r"has an invalid config entry: layers\.0\.fc: KeyError\('kind'\) -> " + SAVE_AGAIN),
    BadFile("checkpoint_config_bad_value", "a config entry with an invalid option value",
            damaged(saved(), edit_config(lambda c: c["modules"]["layers.1.fc"]["config"].update(dropout=2.0))),
            mlp, r"has an invalid config entry: layers\.1\.fc: .*dropout=2\.0 must be a number in \[0, 1\).* -> "
                 + SAVE_AGAIN),
    BadFile("checkpoint_config_extra_module", "a config with an extra module (not in the model, no tensors)",
            damaged(saved(), edit_config(lambda c: c["modules"].update({"layers.2.fc": c["modules"]["layers.1.fc"]}))),
            mlp, r"missing from the model: layers\.2\.fc -> an adapter saved from another model\?"),
    BadFile("adapter_name_already_loaded", "loading an adapter whose name the model already holds", saved(), loaded,
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


# -- docs/errors.md: generated from the rows above and their real messages -------------------------------------------
INTRO = """\
# Errors: bad input and damaged adapter files

Every error below is raised before anything is modified: `inject` validates the configuration and computes the
factors of every target first and only then touches the model, and `load_adapter` reads and checks the whole file
(a sha256 of the tensor file, the config, every module, shape, rank, dtype and a sample of the base weight) before
it attaches anything. So after any of these errors the model's `state_dict` is bit-identical (checked bitwise,
NaN-safe) and no wrapper was added. Messages name the module at fault (where one is) and say what to do;
`load_adapter` lists every problem, one line per kind, each ending in `-> <what to do>`.

Each row is one case of `tests/test_bad_input.py` (`test_bad_input_raises_clearly_and_changes_nothing[<test id>]`
and `test_bad_adapter_file_raises_clearly_and_changes_nothing[<test id>]`). The excerpts are the real messages on
the test models (`<dir>` is the adapter directory), cut to {limit} characters. This file is generated:
`{command}` rewrites it, and `test_docs_errors_md_is_up_to_date` fails when it and the tests
drift apart.
"""


def raised(row: Bad | BadFile, tmp: Path) -> BaseException:
    """The exception that ``row`` raises (it must raise)."""
    if isinstance(row, Bad):
        model = row.build()
        call = lambda: row.call(model)  # noqa: E731
    else:
        path, model = row.make(tmp), row.build()
        call = lambda: nlora.load_adapter(model, path)  # noqa: E731
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except Exception as err:  # noqa: BLE001 - any exception: the table shows its type
        return err
    raise AssertionError(f"{row.id} raised nothing")


def excerpt(message: str, tmp: Path) -> str:
    """The message on one line, ``tmp`` (and import_peft's directory) shown as ``<dir>``, load_adapter's and
    import_peft's header line dropped (the problem lines
    follow it), cut at a word to ``EXCERPT`` characters."""
    message = re.sub(r"\S*/peft\b", "<dir>", message.replace(str(tmp / "adapter"), "<dir>"))
    lines = message.split("\n")
    if len(lines) > 1 and lines[0].startswith(("cannot load adapter", "cannot import adapter")):
        lines = lines[1:]
    text = " ".join(line.strip() for line in lines)
    if len(text) > EXCERPT:
        text = text[: EXCERPT - 2].rsplit(" ", 1)[0] + " …"
    return text


def cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def errors_markdown() -> str:
    """docs/errors.md as the rows give it."""
    out = [INTRO.format(limit=EXCERPT, command=REGENERATE)]
    for title, rows in (("## inject and the model functions", ROWS), ("## Adapter files (`nlora.load_adapter`)",
                                                                         FILE_ROWS)):
        out += [title, "", "| Bad input | Exception | Message (excerpt) | Test id |", "|---|---|---|---|"]
        for row in rows:
            with tempfile.TemporaryDirectory() as tmp:
                err = raised(row, Path(tmp))
                out.append(f"| {row.what} | `{type(err).__name__}` | {cell(excerpt(str(err), Path(tmp)))} | "
                           f"`{row.id}` |")
        out.append("")
    return "\n".join(out)


def test_every_row_is_in_docs_errors_md():
    listed = re.findall(r"`(\w+)`\s*\|\s*$", DOCS.read_text(encoding="utf-8"), flags=re.M)
    assert sorted(listed) == sorted(r.id for r in ROWS + FILE_ROWS), f"run {REGENERATE}"


def test_docs_errors_md_is_up_to_date():
    assert DOCS.read_text(encoding="utf-8") == errors_markdown(), f"docs/errors.md is stale: run {REGENERATE}"


if __name__ == "__main__":
    DOCS.write_text(errors_markdown(), encoding="utf-8")
    print(f"wrote {DOCS}")
