"""Adapter files: save/load nlora adapters (with compact IntTune storage) and export them as plain PEFT LoRA.

Native format: a directory with ``adapter_config.json`` (everything needed to rebuild the adapter) and
``adapter_model.safetensors`` (``adapter_model.pt`` written by ``torch.save`` when safetensors is missing; read
back with ``torch.load(weights_only=True)``). ``load_adapter`` re-attaches the adapter to a fresh base model and
restores its tensors, so the outputs are bit-identical; for inits that rewrote the base weight
(``preserve_output``, pissa) the initial factors come from the file, or, for Nyström inits, are sliced again from
the base, and the same residual update is replayed, so the base weight also ends up bit-identical.

Compact storage: for a Nyström init whose ``A`` and ``B`` are still the slices ``W[I, :]`` and ``W[:, J]`` of the
base weight (IntTune, ``train="middle"``), only ``N`` (and ``N0`` if the base was rewritten), the index sets and a
digest of the slices are stored; ``A`` and ``B`` are sliced again from the base at load and checked against the
digest, which also catches a wrong base model.
"""

from __future__ import annotations

import ctypes
import hashlib
import io as _pyio
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .fingerprint import SAMPLE_SIZE, same_sample, weight_sample
from .inits import Factors, get_init, nystrom_slices
from .layer import Adapter, NLoRALinear, is_conv1d, weight_view
from .model import _EXTRA_TRAINABLE, _candidates, _set_module, adapter_layers, adapter_names, set_adapter

try:  # optional: safetensors is the preferred tensor container, torch.save the fallback
    import safetensors.torch as _safetensors
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _safetensors = None

__all__ = ["save_adapter", "load_adapter", "export_peft", "read_adapter_config"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
TORCH_NAME = "adapter_model.pt"
PEFT_TORCH_NAME = "adapter_model.bin"
FORMAT = "nlora-adapter"
FORMAT_VERSION = 1
# Inits whose A and B are exact slices W[I, :] and W[:, J] of the weight they were attached to (cast to fp32).
SLICE_INITS = ("nystrom", "nystrom-pinv", "nystrom-optimal")
# Files a save may replace in an existing directory; anything else there makes it refuse (never delete user files).
_REPLACEABLE = {CONFIG_NAME, SAFETENSORS_NAME, TORCH_NAME, PEFT_TORCH_NAME, "README.md"}
_TRAINABLE_PREFIX = "trainable:"


# ------------------------------------------------------------------------------------------------ small helpers
def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what}: unknown dtype {name!r} in the adapter config")
    return dtype


def _tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor (read straight from a contiguous CPU copy: no numpy needed)."""
    t = t.detach().to("cpu").contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


def _digest(*tensors: Tensor) -> str:
    """sha256 (first 32 hex digits) over dtype, shape and raw bytes of the tensors: equal iff bit-identical."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:32]


def _slices(weight: Tensor, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(W[rows, :], W[:, cols])`` cast to fp32 then to the adapter dtype, exactly as the Nyström inits take them."""
    a, b = nystrom_slices(weight, rows, cols)
    return a.to(dtype), b.to(dtype)


def _dropout_p(adapter: Adapter) -> float:
    return float(adapter.dropout.p) if isinstance(adapter.dropout, nn.Dropout) else 0.0


def _resolve_adapter(model: nn.Module, adapter: str | None) -> str:
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nlora adapters; call nlora.inject (or load_adapter) first")
    if adapter is None:
        if len(names) != 1:
            raise ValueError(f"the model holds several adapters {names}; pass adapter=<name> to pick one")
        return names[0]
    if adapter not in names:
        raise ValueError(f"no adapter named {adapter!r}; the model has {names}")
    return adapter


def _holders(model: nn.Module, adapter: str, action: str) -> dict[str, NLoRALinear]:
    layers = {n: l for n, l in adapter_layers(model).items() if adapter in l.adapters}
    merged = [n for n, l in layers.items() if l.merged_adapters]
    if merged:
        raise ValueError(f"cannot {action} adapter {adapter!r}: adapters are merged into the base weight of "
                         f"{merged[:6]}; call nlora.unmerge(model) first")
    return layers


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, NLoRALinear):
        module = module.base
    return module


def _walk(model: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path, looking through NLoRALinear wrappers (``x`` and ``x.base`` are the same)."""
    module = _unwrap(model)
    for part in [p for p in path.split(".") if p]:
        child = module._modules.get(part)
        if child is None:
            return None
        module = _unwrap(child)
    return module


def _canonical_params(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """The extra trainable modules' parameters by wrapper-free name, ``{param_name: (module_name, param)}``
    (adapter parameters inside such a module are the adapter's, not saved again)."""
    layers = adapter_layers(model)
    base_owner = {id(l.base): n for n, l in layers.items()}
    found: dict[str, tuple[str, nn.Parameter]] = {}
    for name, module in model.named_modules():
        if not getattr(module, _EXTRA_TRAINABLE, False):
            continue
        mod_name = base_owner.get(id(module), name)
        for pname, p in _unwrap(module).named_parameters():
            parts, cur, keep = [], _unwrap(module), True
            for part in pname.split(".")[:-1]:
                if isinstance(cur, NLoRALinear) and part == "adapters":
                    keep = False
                    break
                if not (isinstance(cur, NLoRALinear) and part == "base"):
                    parts.append(part)
                cur = cur._modules[part]
            if keep:
                full = ".".join(x for x in (mod_name, *parts, pname.split(".")[-1]) if x)
                found[full] = (mod_name, p)
    return found


# ------------------------------------------------------------------------------------------------ atomic writes
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_replaceable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; choose a directory path for the adapter")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _REPLACEABLE)
        if foreign:
            raise ValueError(f"{path} holds files that are not part of an adapter ({foreign[:6]}); refusing to replace "
                             f"it: save to an empty or new directory")


def _write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a whole directory via a temp directory next to it, then swap it in: a crash at any point leaves
    either the previous directory or the new one, never a mix."""
    path = Path(path)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):  # tmp now holds the previous version
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # two renames; the previous version survives under `old` if we die in between
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_tensors(tensors: dict[str, Tensor], file: Path, use_safetensors: bool) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if use_safetensors:
        _safetensors.save_file(tensors, str(file), metadata={"format": "pt"})
    else:
        torch.save(tensors, file)


def _write_json(obj: dict, file: Path) -> None:
    """Indented JSON, except that each entry of a ``modules`` mapping takes one line."""
    modules = obj.get("modules")
    head = {k: v for k, v in obj.items() if k != "modules"}
    text = json.dumps(head, indent=2, allow_nan=False)
    if isinstance(modules, dict):
        lines = ",\n".join(f"    {json.dumps(n)}: {json.dumps(r, allow_nan=False)}" for n, r in modules.items())
        text = text[:-2] + ',\n  "modules": {\n' + lines + "\n  }\n}"
    with open(file, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")


def _sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ saving
def _module_record(name: str, layer: NLoRALinear, adapter: str, compact: bool) -> tuple[dict, dict[str, Tensor]]:
    """One adapted module's config entry and tensors (keys relative to the module)."""
    ad: Adapter = layer.adapters[adapter]
    w = weight_view(layer.base)
    adtype = ad.lora_A.dtype
    others_preserve = [n for n, a in layer.adapters.items() if n != adapter and a.preserve_output]
    tensors: dict[str, Tensor] = {}
    from_base: list[str] = []
    digest = None
    if compact and ad.init in SLICE_INITS and ad.rows is not None and ad.cols is not None:
        if ad.preserve_output:
            # init_A/init_B are the slices of the weight the adapter was attached to; that weight is now
            # W - s B0 N0 A0, so check it gives them back (to rounding) before trusting them to the base.
            if _slices_consistent(w, ad):
                ref_a, ref_b = ad.init_A, ad.init_B
                from_base = ["init_A", "init_B"]
        elif not others_preserve:  # the weight it was attached to is the current one: compare exactly
            ref_a, ref_b = _slices(w, ad.rows, ad.cols, adtype)
            from_base = []
            if torch.equal(ref_a, ad.lora_A) and torch.equal(ref_b, ad.lora_B):
                from_base = ["lora_A", "lora_B"]
        if ad.preserve_output and from_base:
            if torch.equal(ref_a, ad.lora_A) and torch.equal(ref_b, ad.lora_B):
                from_base += ["lora_A", "lora_B"]
        if from_base:
            digest = _digest(ref_a, ref_b)
    for key in ("lora_A", "lora_N", "lora_B"):
        t = getattr(ad, key)
        if t is not None and key not in from_base:
            tensors[key] = t
    if ad.preserve_output:
        for key in ("init_A", "init_N", "init_B"):
            t = getattr(ad, key)
            if t is not None and key not in from_base:
                tensors[key] = t
    if ad.rows is not None and ad.cols is not None:
        index = torch.stack([ad.rows.to("cpu", torch.int64), ad.cols.to("cpu", torch.int64)])
        tensors["index"] = index.to(torch.int32) if max(w.shape) < 2**31 else index
    sample = getattr(ad, "base_sample", None)
    if sample is None and not ad.preserve_output and not others_preserve:
        sample = weight_sample(w)  # an adapter built without attach: the current weight is the one it sits on
    if sample is not None and not from_base:
        tensors["base_sample"] = sample
    try:
        options = json.loads(json.dumps(ad.options, allow_nan=False))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: adapter {adapter!r} has init options {ad.options!r} that JSON cannot hold") from None
    record = {
        "kind": "Conv1D" if is_conv1d(layer.base) else "Linear",
        "shape": list(w.shape),
        "base_dtype": _dtype_name(w.dtype),
        "rank": ad.rank,
        "alpha": ad.alpha,
        "init": ad.init,
        "options": options,
        "train": ad.train_mode,
        "preserve_output": bool(ad.preserve_output),
        "dropout": _dropout_p(ad),
        "adapter_dtype": _dtype_name(adtype),
        "compute_dtype": _dtype_name(ad.compute_dtype),
        "stored": sorted(tensors),
        "from_base": sorted(from_base),
        "slice_digest": digest,
        "preserving_adapters_on_layer": others_preserve,
    }
    return record, tensors


def _slices_consistent(w: Tensor, ad: Adapter) -> bool:
    """Whether ``W + s B0 N0 A0`` (the weight before the residual update) matches ``init_A``/``init_B`` on the
    sampled rows and columns, to the rounding of one residual update."""
    if ad.init_A is None or ad.init_B is None:
        return False
    a0, b0 = ad.init_A.float(), ad.init_B.float()
    n0 = ad.init_N.float() if ad.init_N is not None else None
    core = b0 * ad.scaling if n0 is None else (b0 * ad.scaling) @ n0
    rows, cols = ad.rows.to(w.device), ad.cols.to(w.device)
    pre_rows = w.index_select(0, rows).float() + core.index_select(0, rows) @ a0
    pre_cols = w.index_select(1, cols).float() + core @ a0.index_select(1, cols)
    eps = max(torch.finfo(w.dtype).eps, torch.finfo(torch.float32).eps)  # computed in fp32 above (fp64 bases too)
    ulp = torch.finfo(ad.init_A.dtype).eps  # init_A/B are the slices rounded to the adapter dtype (bf16: coarser)
    for pre, ref in ((pre_rows, a0), (pre_cols, b0)):
        tol = 4 * eps * (pre.abs() + (core.abs().max() * a0.abs().max() * core.shape[1])) + ulp * ref.abs() + 1e-30
        if not bool(((pre - ref).abs() <= tol).all()):
            return False
    return True


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, *, compact: bool = True,
                 include_trainable: bool = True) -> Path:
    """Write one named adapter (config + tensors) to the directory ``path``, atomically; returns the path.

    ``adapter=None`` takes the model's only adapter. ``compact=True`` stores Nyström factors that are still slices
    of the base weight as index sets plus a digest (IntTune adapters become ~(in+out)/r times smaller);
    ``compact=False`` stores every tensor. Extra trainable modules (``inject(trainable=...)``) are saved too when
    ``include_trainable``. Adapters must not be merged (``nlora.unmerge`` first).
    """
    from . import __version__

    name = _resolve_adapter(model, adapter)
    layers = _holders(model, name, "save")
    bad = [n for n, l in layers.items() if getattr(l.adapters[name], "pending_init", False)]
    if bad:
        raise ValueError(f"adapter {name!r} has no values yet in {bad[:4]} (injected on the meta device); "
                         f"initialise it first")
    records: dict[str, dict] = {}
    tensors: dict[str, Tensor] = {}
    for module_name, layer in layers.items():
        records[module_name], own = _module_record(module_name, layer, name, compact)
        tensors.update({f"{module_name}.{k}": v for k, v in own.items()})
    defaults, modules = _factor_defaults(records)
    trainable = _canonical_params(model) if include_trainable else {}
    tensors.update({_TRAINABLE_PREFIX + k: p for k, (_, p) in trainable.items()})
    use_st = _safetensors is not None
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nlora_version": __version__,
        "adapter_name": name,
        "model_class": type(model).__name__,
        "tensor_file": SAFETENSORS_NAME if use_st else TORCH_NAME,
        "tensor_sha256": None,
        "sample_size": SAMPLE_SIZE,
        "module_defaults": defaults,
        "modules": modules,
        "trainable_modules": sorted({m for m, _ in trainable.values()}),
        "trainable_params": {k: {"shape": list(p.shape), "dtype": _dtype_name(p.dtype)}
                             for k, (_, p) in trainable.items()},
    }

    def write(tmp: Path) -> None:
        file = tmp / config["tensor_file"]
        _write_tensors(tensors, file, use_st)
        config["tensor_sha256"] = _sha256_file(file)
        _write_json(config, tmp / CONFIG_NAME)

    return _write_atomically(path, write)


def _factor_defaults(records: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """Split per-module records into the most common value of each field and per-module differences (small configs
    for models with hundreds of adapted layers)."""
    defaults = {}
    for key in next(iter(records.values())):
        if key in ("shape", "slice_digest"):
            continue
        counts = Counter(json.dumps(r[key], sort_keys=True) for r in records.values())
        defaults[key] = json.loads(counts.most_common(1)[0][0])
    modules = {n: {k: v for k, v in r.items() if k not in defaults or v != defaults[k]} for n, r in records.items()}
    return defaults, modules


# ------------------------------------------------------------------------------------------------ loading
_SAVE_AGAIN = "the file is damaged or was edited: save the adapter again from the trained model"
_OTHER_MODEL = "an adapter saved from another model? load it into the model (architecture) it was saved from"
# What to do about each kind of load problem (matched by prefix), appended to its line of the error message.
_LOAD_FIXES = {
    "file has tensors": _SAVE_AGAIN, "file lacks tensors": _SAVE_AGAIN, "has an invalid config entry": _SAVE_AGAIN,
    "has tensors that do not belong": _SAVE_AGAIN, "rank/shape mismatch": _SAVE_AGAIN, "has invalid": _SAVE_AGAIN,
    "tensor dtype differs": _SAVE_AGAIN, "is missing tensors": _SAVE_AGAIN,
    "missing from the model": _OTHER_MODEL, "is not a Linear/Conv1D": _OTHER_MODEL,
    "shape mismatch": "load it into the base model it was trained on",
    "already has an adapter": "pass adapter='<new name>' to load it under another name, or nlora.delete_adapter first",
    "base weight differs": "load the base checkpoint it was trained on, or pass check_base=False to put it on this "
                           "one on purpose",
    "base weight slices differ": "load the base checkpoint (and dtype) it was saved on",
    "trainable ": "load it into the model it was saved from, or save it with include_trainable=False",
}


def _load_fix(kind: str) -> str:
    return next((f" -> {fix}" for key, fix in _LOAD_FIXES.items() if kind.startswith(key)), "")


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json`` of a native nlora adapter directory (validated format)."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; save_adapter writes a directory")
    if not file.is_file():
        raise ValueError(f"{path} has no {CONFIG_NAME}: not an adapter directory; pass the directory save_adapter "
                         f"wrote")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is corrupted (not valid JSON: {err}); {_SAVE_AGAIN}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        kind = "a PEFT adapter (load it with peft)" if isinstance(config, dict) and "peft_type" in config else \
            "not an nlora adapter"
        raise ValueError(f"{file} is {kind}; expected format {FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {config.get('format_version')!r}; this nlora reads "
                         f"{FORMAT_VERSION}: upgrade nlora")
    for key in ("adapter_name", "tensor_file", "tensor_sha256", "modules"):
        if key not in config:
            raise ValueError(f"{file} is corrupted: the key {key!r} is missing; {_SAVE_AGAIN}")
    defaults = config.get("module_defaults", {})
    if not isinstance(config["modules"], dict) or not config["modules"] or not isinstance(defaults, dict) or \
            not all(isinstance(r, dict) for r in config["modules"].values()):
        raise ValueError(f"{file} is corrupted: 'modules' must be a non-empty mapping of module entries; "
                         f"{_SAVE_AGAIN}")
    config["modules"] = {n: {**defaults, **r} for n, r in config["modules"].items()}  # entries complete from here on
    return config


def _read_tensors(path: Path, config: dict) -> dict[str, Tensor]:
    name = config["tensor_file"]
    if name not in (SAFETENSORS_NAME, TORCH_NAME):
        raise ValueError(f"{path / CONFIG_NAME}: unknown tensor_file {name!r}")
    file = path / name
    if not file.is_file():
        raise ValueError(f"{path} has no {name}: the adapter directory is incomplete; {_SAVE_AGAIN}")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != config["tensor_sha256"]:
        raise ValueError(f"{file} is corrupted or truncated (sha256 differs from the one recorded at save time, "
                         f"{len(data)} bytes); save the adapter again")
    try:
        if name == SAFETENSORS_NAME:
            if _safetensors is None:
                raise ValueError(f"{file} is a safetensors file but safetensors is not installed; "
                                 f"pip install safetensors")
            tensors = _safetensors.load(data)
        else:
            tensors = torch.load(_pyio.BytesIO(data), map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure of a file whose hash matched is corruption
        raise ValueError(f"{file} could not be read ({type(err).__name__}: {err}); {_SAVE_AGAIN}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{file} does not hold a mapping of names to tensors; {_SAVE_AGAIN}")
    return tensors


@dataclass
class _Plan:
    name: str
    module: nn.Module
    base: nn.Module
    record: dict
    factors: Factors
    current: dict[str, Tensor] = field(default_factory=dict)


def _expected_shapes(rec: dict) -> dict[str, tuple[int, ...]]:
    out_f, in_f = rec["shape"]
    r = rec["rank"]
    has_n = get_init(rec["init"]).has_middle
    shapes = {"lora_A": (r, in_f), "lora_B": (out_f, r), "init_A": (r, in_f), "init_B": (out_f, r),
              "index": (2, r), "base_sample": (SAMPLE_SIZE,)}
    if has_n:
        shapes.update(lora_N=(r, r), init_N=(r, r))
    return shapes


def _plan_module(name: str, rec: dict, tensors: dict[str, Tensor], module: nn.Module, adapter: str,
                 problems: dict[str, list[str]], check_base: bool = True) -> _Plan | None:
    """Check one module against the file and build the factors to attach; records problems instead of raising."""

    def fail(kind: str, text: str) -> None:
        problems.setdefault(kind, []).append(text)

    base = module.base if isinstance(module, NLoRALinear) else module
    if isinstance(module, NLoRALinear):
        if adapter in module.adapters:
            fail("already has an adapter of that name", name)
            return None
        if module.merged_adapters:
            fail("has merged adapters (nlora.unmerge first)", name)
            return None
    elif not (isinstance(module, nn.Linear) or is_conv1d(module)):
        fail("is not a Linear/Conv1D in this model", f"{name} ({type(module).__name__})")
        return None
    kind = "Conv1D" if is_conv1d(base) else "Linear"
    w = weight_view(base)
    try:
        if not isinstance(rec.get("stored"), list) or not isinstance(rec.get("from_base"), list):
            raise ValueError(f"{name}: 'stored' and 'from_base' must be lists")
        shape = rec["shape"]
        if rec["kind"] not in ("Linear", "Conv1D") or not (isinstance(shape, list) and len(shape) == 2 and
                                                           all(isinstance(d, int) and d > 0 for d in shape)):
            raise ValueError(f"{name}: kind {rec['kind']!r} / shape {shape!r} are not a Linear/Conv1D (out, in)")
        spec = get_init(rec["init"])
        adtype = _dtype(rec["adapter_dtype"], name)
        _dtype(rec["compute_dtype"], name)
        rank = rec["rank"]
        if not isinstance(rank, int) or not 0 < rank <= min(shape):
            raise ValueError(f"{name}: rank {rank!r} does not fit a {tuple(shape)} layer")
        if rec["train"] not in ("all", "middle"):
            raise ValueError(f"{name}: unknown train mode {rec['train']!r}")
        alpha = float(rec["alpha"])
        if not math.isfinite(alpha):
            raise ValueError(f"{name}: alpha {rec['alpha']!r} is not finite")
        if not isinstance(rec["preserve_output"], bool) or not (isinstance(rec["dropout"], (int, float))
                                                                 and 0 <= rec["dropout"] < 1):
            raise ValueError(f"{name}: preserve_output {rec['preserve_output']!r} / dropout {rec['dropout']!r} invalid")
        if rec["from_base"] and not isinstance(rec.get("slice_digest"), str):
            raise ValueError(f"{name}: tensors rebuilt from the base need a slice_digest")
        if not isinstance(rec["options"], dict) or set(rec["options"]) - set(spec.options):
            raise ValueError(f"{name}: init options {rec['options']!r} are not options of {rec['init']!r}")
    except (KeyError, ValueError, TypeError) as err:
        fail("has an invalid config entry", str(err) if not isinstance(err, KeyError) else f"{name}: missing {err}")
        return None
    if kind != rec["kind"] or list(w.shape) != list(rec["shape"]):
        fail("shape mismatch (wrong base model?)", f"{name}: saved {rec['kind']} (out, in) = {tuple(rec['shape'])}, "
                                                  f"model has {kind} {tuple(w.shape)}")
        return None
    expected = _expected_shapes(rec)
    own = {k: tensors[f"{name}.{k}"] for k in rec["stored"] if f"{name}.{k}" in tensors}
    for key, t in own.items():
        want = expected.get(key)
        if want is None:
            fail("has tensors that do not belong to its init", f"{name}.{key}")
            return None
        if tuple(t.shape) != want:
            fail("rank/shape mismatch between file and config", f"{name}.{key}: shape {tuple(t.shape)}, expected "
                                                                f"{want} for rank {rank} on {tuple(rec['shape'])}")
            return None
        if key == "index":
            if t.dtype not in (torch.int32, torch.int64) or (t < 0).any() or (t[0] >= w.shape[0]).any() \
                    or (t[1] >= w.shape[1]).any():
                fail("has invalid index sets", name)
                return None
        elif key == "base_sample":
            if not t.is_floating_point():
                fail("has an invalid base sample", name)
                return None
        elif t.dtype != adtype:
            fail("tensor dtype differs from the config", f"{name}.{key}: {t.dtype}, config says {adtype}")
            return None
    rows = cols = None
    if "index" in own:
        rows, cols = own["index"][0].to(torch.int64), own["index"][1].to(torch.int64)  # the buffers' dtype
    if "base_sample" in own and check_base:
        now = weight_sample(w)
        if now is not None and not same_sample(own["base_sample"], now):
            fail("base weight differs from the one the adapter was saved on (wrong base model, or a different "
                 "checkpoint)", name + _dtype_hint(rec, w) + _preserving_hint(rec))
            return None
    values = dict(own)
    if rec["from_base"]:
        if rows is None:
            fail("has invalid index sets", f"{name}: rebuilt from the base but no index stored")
            return None
        sa, sb = _slices(w, rows, cols, adtype)
        if _digest(sa, sb) != rec.get("slice_digest"):
            fail("base weight slices differ from the ones saved (wrong base model, or a different dtype/"
                 "checkpoint)", name + _dtype_hint(rec, w) + _preserving_hint(rec))
            return None
        for key in rec["from_base"]:
            values[key] = sa if key.endswith("_A") else sb
    needed = ["lora_A", "lora_B"] + (["lora_N"] if spec.has_middle else [])
    if rec["preserve_output"]:
        needed += ["init_A", "init_B"] + (["init_N"] if spec.has_middle else [])
    missing = [k for k in needed if k not in values]
    if missing:
        fail("is missing tensors", f"{name}: {missing}")
        return None
    prefix = "init_" if rec["preserve_output"] else "lora_"
    factors = Factors(values[prefix + "A"], values.get(prefix + "N"), values[prefix + "B"], rows, cols)
    current = {k: values[k] for k in ("lora_A", "lora_N", "lora_B") if k in values}
    return _Plan(name, module, base, rec, factors, current)


def _dtype_hint(rec: dict, w: Tensor) -> str:
    now = _dtype_name(w.dtype)
    return f" (saved on a {rec['base_dtype']} base, model is {now})" if rec.get("base_dtype") != now else ""


def _preserving_hint(rec: dict) -> str:
    others = rec.get("preserving_adapters_on_layer") or []
    return (f" [at save time adapters {others} that rewrite the base weight were also on this layer: load all of "
            f"them in the order they were first attached]" if others else "")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, *,
                 check_base: bool = True) -> nn.Module:
    """Attach the adapter saved at ``path`` to ``model`` (a fresh base model, or one holding other adapters) and
    make it the active adapter; returns ``model``.

    All-or-nothing: the file, every module, shape, rank, dtype and the base weights are checked before anything
    is changed; any problem raises one ValueError naming the modules and leaves the model bit-identical.
    ``adapter`` renames the adapter (default: the saved name). ``check_base=False`` skips the base-weight sample
    check, to put an adapter on purpose onto another checkpoint of the same architecture (outputs then differ from
    the saved model's); compact Nyström modules still refuse a base whose slices differ, since A and B come from it.
    """
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_tensors(path, config)
    name = adapter or config["adapter_name"]
    problems: dict[str, list[str]] = {}
    model_modules = _candidates(model)
    # keys: every tensor in the file must be claimed by the config, and the other way round
    merged = [n for n, l in adapter_layers(model).items() if l.merged_adapters]
    if merged:
        problems.setdefault("model has merged adapters (call nlora.unmerge(model) first)", []).extend(merged)
    claimed = {f"{m}.{k}" for m, rec in config["modules"].items() if isinstance(rec, dict)
               for k in (rec.get("stored") if isinstance(rec.get("stored"), list) else [])}
    claimed |= {_TRAINABLE_PREFIX + k for k in config.get("trainable_params", {})}
    if set(tensors) - claimed:
        problems.setdefault("file has tensors the config does not describe", []).extend(sorted(set(tensors) - claimed))
    if claimed - set(tensors):
        problems.setdefault("file lacks tensors the config lists", []).extend(sorted(claimed - set(tensors)))
    plans: list[_Plan] = []
    for module_name, rec in config["modules"].items():
        module = model_modules.get(module_name)
        if module is None:
            problems.setdefault("missing from the model", []).append(module_name)
            continue
        if not isinstance(rec, dict):
            problems.setdefault("has an invalid config entry", []).append(module_name)
            continue
        plan = _plan_module(module_name, rec, tensors, module, name, problems, check_base)
        if plan is not None:
            plans.append(plan)
    extra = _plan_trainable(model, config, tensors, problems)
    if problems:
        lines = [f"  {kind}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}{_load_fix(kind)}"
                 for kind, items in problems.items()]
        raise ValueError(f"cannot load adapter {name!r} from {path} into {type(model).__name__}; nothing was "
                         f"changed:\n" + "\n".join(lines))
    for plan in plans:  # apply: nothing below can fail on a checked plan
        rec = plan.record
        if isinstance(plan.module, NLoRALinear):
            layer = plan.module
        else:
            layer = NLoRALinear.wrapping(plan.base, plan.name)
            _set_module(model, plan.name, layer)
        ad = layer.attach(name, plan.factors, rank=rec["rank"], alpha=float(rec["alpha"]), init=rec["init"],
                          train=rec["train"], dropout=float(rec["dropout"]), preserve_output=rec["preserve_output"],
                          adapter_dtype=_dtype(rec["adapter_dtype"], plan.name),
                          compute_dtype=_dtype(rec["compute_dtype"], plan.name), options=dict(rec["options"]))
        with torch.no_grad():
            for key, value in plan.current.items():
                getattr(ad, key).copy_(value)
    for module, params in extra:
        with torch.no_grad():
            for p, value in params:
                p.copy_(value)
        setattr(module, _EXTRA_TRAINABLE, True)
    set_adapter(model, name)
    return model


def _plan_trainable(model: nn.Module, config: dict, tensors: dict[str, Tensor],
                    problems: dict[str, list[str]]) -> list[tuple[nn.Module, list[tuple[nn.Parameter, Tensor]]]]:
    out: dict[str, tuple[nn.Module, list]] = {}
    for mod_name in config.get("trainable_modules", []):
        module = _walk(model, mod_name)
        if module is None:
            problems.setdefault("trainable module missing from the model", []).append(mod_name)
        else:
            out[mod_name] = (module, [])
    for pname, meta in config.get("trainable_params", {}).items():
        key = _TRAINABLE_PREFIX + pname
        owner = max((m for m in out if pname.startswith(m + ".") or not m), key=len, default=None)
        mod_path, _, attr = pname.rpartition(".")
        holder = _walk(model, mod_path)
        p = holder._parameters.get(attr) if holder is not None else None
        if owner is None or p is None:
            problems.setdefault("trainable parameter missing from the model", []).append(pname)
            continue
        t = tensors.get(key)
        if t is None:
            continue  # reported with the key check
        if tuple(t.shape) != tuple(p.shape) or list(t.shape) != list(meta.get("shape", [])):
            problems.setdefault("trainable parameter shape mismatch", []).append(
                f"{pname}: saved {tuple(t.shape)}, model {tuple(p.shape)}")
            continue
        out[owner][1].append((p, t))
    return list(out.values())


# ------------------------------------------------------------------------------------------------ PEFT export
def _peft_pattern_key(keys: list[str], name: str) -> str:
    """How PEFT (>= 0.14) picks a rank_pattern/alpha_pattern key for a module name."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _patterns(values: dict[str, float], default: float, what: str) -> dict[str, float]:
    """A PEFT rank/alpha pattern giving every module its value under PEFT's first-match-wins lookup."""
    pattern = {n: v for n, v in values.items() if v != default}
    for _ in range(len(values) + 1):
        keys = sorted(pattern, key=lambda k: (-len(k), k.count(".")))  # longest, then fewest wildcards, first
        wrong = [n for n, v in values.items() if pattern.get(_peft_pattern_key(keys, n), default) != v]
        if not wrong:
            return {k: pattern[k] for k in keys}
        for n in wrong:
            pattern[n] = values[n]
    raise ValueError(f"module names {sorted(values)[:6]} cannot be given their own {what} under PEFT's pattern "
                     f"matching; rename the modules or use one {what} for all of them")


def _target_modules(model: nn.Module, targets: list[str]) -> list[str] | str:
    """PEFT ``target_modules``: the list of full names when that matches exactly them, else a fullmatch regex."""
    names = list(_candidates(model))
    hit = {n for n in names for t in targets if n == t or n.endswith("." + t)}
    if hit == set(targets):
        return sorted(targets)
    return "(" + "|".join(re.escape(t) for t in sorted(targets)) + ")"


def _peft_factors(ad: Adapter, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(A', B')`` with ``s B' A' = s (B N A - B0 N0 A0)`` (the second block only for inits that rewrote the base)."""
    def fold(a: Tensor, n: Tensor | None, b: Tensor) -> tuple[Tensor, Tensor]:
        b = b.double()
        return a.double(), (b if n is None else b @ n.double())

    blocks = [fold(ad.lora_A, ad.lora_N, ad.lora_B)]
    if ad.preserve_output:
        a0, b0 = fold(ad.init_A, ad.init_N, ad.init_B)
        blocks.append((a0, -b0))
    a = torch.cat([x for x, _ in blocks], dim=0)
    b = torch.cat([y for _, y in blocks], dim=1)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def export_peft(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, *,
                dtype: torch.dtype = torch.float32, base_model_name_or_path: str | None = None,
                include_trainable: bool = True) -> Path:
    """Write adapter ``adapter`` as a plain HF PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(original_base_model, path)`` loads with the same outputs; returns the path.

    ``N`` is folded into ``B' = B N`` (scaling kept). An adapter whose init rewrote the base weight
    (``preserve_output``, pissa) is exported relative to the ORIGINAL weights as the rank-2r LoRA
    ``A' = [A; A0]``, ``B' = [B N, -B0 N0]`` with r and alpha doubled. Per-module ranks and alphas go to
    ``rank_pattern``/``alpha_pattern``; Conv1D layers set ``fan_in_fan_out``; extra trainable modules go to
    ``modules_to_save`` (unless ``include_trainable=False``). Tensors are written in ``dtype``.
    """
    name = _resolve_adapter(model, adapter)
    layers = _holders(model, name, "export")
    others = sorted({n for l in adapter_layers(model).values() for n, a in l.adapters.items()
                     if n != name and a.preserve_output})
    if others:
        raise ValueError(f"adapters {others} also rewrote base weights (preserve_output): a PEFT file of {name!r} "
                         f"alone cannot reproduce this model; delete_adapter them (or export from a model holding "
                         f"only {name!r})")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts, kinds = [], []
    for module_name, layer in layers.items():
        ad = layer.adapters[name]
        a, b = _peft_factors(ad, dtype)
        blocks = a.shape[0] // ad.rank
        ranks[module_name] = a.shape[0]
        alphas[module_name] = ad.alpha * blocks
        tensors[f"base_model.model.{module_name}.lora_A.weight"] = a
        tensors[f"base_model.model.{module_name}.lora_B.weight"] = b
        dropouts.append(_dropout_p(ad))
        kinds.append(is_conv1d(layer.base))
    to_save = _canonical_params(model) if include_trainable else {}
    save_modules = sorted({m for m, _ in to_save.values()})
    clash = [m for m in save_modules for t in layers if t == m or t.startswith(m + ".")]
    if clash:
        raise ValueError(f"trainable modules {clash[:4]} are also (or contain) adapted modules; PEFT cannot express "
                         f"that: drop them from trainable, or export without them")
    all_names = list(_candidates(model))
    for m in save_modules:
        if [n for n in all_names if n.endswith(m) and n != m and not n.startswith(m + ".")]:
            raise ValueError(f"trainable module {m!r}: PEFT's modules_to_save matching (suffix) would also pick "
                             f"other modules; rename it or leave it out")
    saved_ids = {id(p) for _, p in to_save.values()}
    tied = sorted({n.replace(".base.", ".") for n, p in model.named_parameters(remove_duplicate=False)
                   if id(p) in saved_ids and not any(n.startswith(m + ".") for m in save_modules)})
    if tied:
        raise ValueError(f"trainable modules {save_modules[:4]} share weights with {tied[:4]} (tied weights, e.g. an "
                         f"output head tied to the input embedding); PEFT's modules_to_save trains a copy of the named "
                         f"module only, which unties them, so the export would not reproduce this model: export with "
                         f"include_trainable=False and ship the tied weights separately (or untie them before "
                         f"training)")
    for pname, (_, p) in to_save.items():
        tensors[f"base_model.model.{pname}"] = p.detach().to(dtype if p.is_floating_point() else p.dtype)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None),
                                                                      "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(model, list(layers)),
        "lora_dropout": Counter(dropouts).most_common(1)[0][0],
        "fan_in_fan_out": bool(kinds) and all(kinds),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": save_modules or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _patterns(ranks, r, "rank"),
        "alpha_pattern": _patterns(alphas, alpha, "alpha"),
    }
    use_st = _safetensors is not None

    def write(tmp: Path) -> None:
        _write_tensors(tensors, tmp / (SAFETENSORS_NAME if use_st else PEFT_TORCH_NAME), use_st)
        _write_json(config, tmp / CONFIG_NAME)

    return _write_atomically(path, write)
