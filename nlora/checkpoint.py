"""Native adapter files: ``save_adapter`` / ``load_adapter`` (strict, all-or-nothing), with compact IntTune storage.

A directory with ``adapter_config.json`` (the adapter's ``AdapterConfig``, per-module differences, shapes and a
sha256 of the tensor file) and ``adapter_model.safetensors``. Loading re-attaches the adapter to a fresh base model
and restores its tensors, so the outputs are bit-identical; an init that rewrote the base weight replays the same
residual update, so the base weight ends up bit-identical too. *Compact* storage: factors that are the base weight's
own sampled rows and columns (Nyström A and B of IntTune, the initial A0 and B0 of any Nyström init) are not stored;
they are sliced again from the base at load and checked against a digest of the saved slices.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import safetensors.torch
import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .factors import meta_factors
from .inits import Factors, nystrom_slices
from .layer import SAMPLE_SIZE, Adapter, NLoRALinear, dense_weight, is_adaptable, is_conv1d, weight_sample
from .model import (_TRAINABLE, _candidates, _refuse_modules, _refuse_unknown, adapter_layers, adapter_names,
                    set_adapter, trainable_module_names, unwrap, wrap_layer)

CONFIG_NAME = "adapter_config.json"
TENSOR_NAME = "adapter_model.safetensors"
FORMAT, FORMAT_VERSION = "nlora-adapter", 2
_TRAINABLE_PREFIX = "trainable:"
_SAVE_AGAIN = "the file is damaged or was edited: save the adapter again from the trained model"
_OTHER_MODEL = "an adapter saved from another model? load it into the model (architecture) it was saved from"


# ---------------------------------------------------------------------------------------------------- small helpers
def same_sample(saved: Tensor, current: Tensor) -> bool:
    """Whether two samples agree exactly (NaN with NaN) once rounded to the less precise of their dtypes."""
    low = saved.dtype if torch.finfo(saved.dtype).eps >= torch.finfo(current.dtype).eps else current.dtype
    return torch.allclose(saved.to("cpu", low), current.to("cpu", low), rtol=0, atol=0, equal_nan=True)


def _digest(*tensors: Tensor) -> str:
    """sha256 (32 hex digits) of the tensors' dtypes, shapes and bytes: equal iff bit-identical."""
    data = [f"{t.dtype}{tuple(t.shape)}".encode() + t.detach().to("cpu").reshape(-1)
            .clone(memory_format=torch.contiguous_format).view(torch.uint8).numpy().tobytes() for t in tensors]
    return hashlib.sha256(b"".join(data)).hexdigest()[:32]


def _resolve(model: nn.Module, adapter: str | None, action: str) -> tuple[str, dict[str, NLoRALinear]]:
    """The adapter's name and the layers holding it, refusing a model without it, with merged adapters, or where it
    has no values yet (injected on the meta device)."""
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nlora adapters; call nlora.inject (or load_adapter) first")
    if adapter is None and len(names) != 1:
        raise ValueError(f"the model holds several adapters {names}; pass adapter=<name> to pick one")
    name = names[0] if adapter is None else adapter
    _refuse_unknown(model, name, one=True)
    layers = {n: layer for n, layer in adapter_layers(model).items() if name in layer.adapters}
    _refuse_modules([n for n, layer in layers.items() if layer.merged_adapters], "cannot {action} adapter {name!r}: "
                    "adapters are merged into the base weight of {names}; call nlora.unmerge(model) first",
                    action=action, name=name)
    _refuse_modules([n for n, layer in layers.items() if layer.adapters[name].pending], "adapter {name!r} has no "
                    "values yet in {names} (injected on the meta device); call nlora.initialize_adapters(model) first",
                    name=name)
    return name, layers


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the modules trained in full (``inject(trainable=...)``) by their wrapper-free names."""
    return {f"{name}.{pname}".replace(".base.", ".").lstrip("."): p
            for name, module in model.named_modules() if getattr(module, _TRAINABLE, False)
            for pname, p in unwrap(module).named_parameters() if ".adapters." not in f".{pname}"}


def write_files(path: str | os.PathLike, tensors: dict[str, Tensor], config: dict, checksum: bool = True) -> Path:
    """Write the tensors, then the JSON config that records their sha256, each by an atomic ``os.replace``: a reader
    sees the old pair, the new pair, or a mismatch that the checksum refuses; files of other names are kept."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; choose a directory path for the adapter")
    path.mkdir(parents=True, exist_ok=True)
    data = safetensors.torch.save({k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                                   for k, v in tensors.items()},
                                  metadata={"format": "pt"})
    config = {**config, "tensor_sha256": hashlib.sha256(data).hexdigest()} if checksum else config
    for name, blob in ((TENSOR_NAME, data), (CONFIG_NAME, (json.dumps(config, indent=1) + "\n").encode())):
        tmp = path / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path / name)
    return path


# ---------------------------------------------------------------------------------------------------- saving
def _from_base(layer: NLoRALinear, adapter: Adapter, compact: bool) -> list[str]:
    """The factors a compact file takes from the base weight's sampled rows and columns instead of storing them."""
    config = adapter.config
    if (not (compact and config.init.startswith("nystrom") and adapter.rows is not None and adapter.from_weight)
            or any(a.config.preserve_output for a in layer.adapters.values() if a is not adapter)):
        return []  # (the second: another adapter rewrote this weight, so its slices are not the original ones)
    if config.preserve_output:
        return ["init_A", "init_B"] + (["lora_A", "lora_B"] if config.train == "middle" else [])
    return ["lora_A", "lora_B"] if adapter.reads_base else []


def _module_record(layer: NLoRALinear, adapter: Adapter, default: dict, compact: bool) -> tuple[dict, dict]:
    """One adapted module's config entry and its tensors (keys relative to the module)."""
    w = dense_weight(layer.base)
    from_base = _from_base(layer, adapter, compact)
    a, n, b = adapter.factors(w)
    index = None if adapter.rows is None else torch.stack([adapter.rows, adapter.cols]).to("cpu", torch.int32)  # < 2^31
    tensors = {"lora_A": a, "lora_N": n, "lora_B": b,  # init_*: None unless the init rewrote the base weight
               "init_A": adapter.init_A, "init_N": adapter.init_N, "init_B": adapter.init_B, "index": index,
               "base_sample": None if from_base else getattr(adapter, "base_sample", None)}  # else: the slices' digest
    tensors = {k: v for k, v in tensors.items() if v is not None and k not in from_base}
    record = {"kind": "Conv1D" if is_conv1d(layer.base) else "Linear", "shape": list(w.shape),
              "base_dtype": str(w.dtype).removeprefix("torch."), "stored": sorted(tensors), "from_base": from_base,
              "config": {k: v for k, v in adapter.config.to_dict().items() if default.get(k) != v}}
    if from_base:
        slices = (adapter.init_A, adapter.init_B) if adapter.config.preserve_output else (a, b)
        record["slice_digest"] = _digest(*(t.to(adapter.config.adapter_dtype) for t in slices))
        record["slice_digest_low"] = {  # the same for copies of the base cast to bf16 or fp16, if less precise
            str(d)[6:]: _digest(*(t.to(w.dtype).to(d) for t in slices))
            for d in (torch.bfloat16, torch.float16) if torch.finfo(d).eps > torch.finfo(w.dtype).eps}
    return record, tensors


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, *, compact: bool = True,
                 include_trainable: bool = True) -> Path:
    """Write the adapter named ``adapter`` (default: the model's only one) to the directory ``path``; returns it.

    ``compact=True`` leaves out factors that are slices of the base weight (IntTune files become ~(in+out)/r times
    smaller); ``compact=False`` stores every tensor. Modules trained in full (``inject(trainable=...)``) are saved too
    when ``include_trainable``. Adapters must not be merged (``nlora.unmerge`` first).
    """
    from . import __version__

    name, layers = _resolve(model, adapter, "save")
    default = next(iter(layers.values())).adapters[name].config.to_dict()
    records = {n: _module_record(layer, layer.adapters[name], default, compact) for n, layer in layers.items()}
    tensors = {f"{n}.{k}": v for n, (_, own) in records.items() for k, v in own.items()}
    extra = trainable_params(model) if include_trainable else {}
    tensors.update({_TRAINABLE_PREFIX + k: p for k, p in extra.items()})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "nlora_version": __version__, "adapter_name": name,
              "model_class": type(model).__name__, "config": default,
              "modules": {n: record for n, (record, _) in records.items()},
              "trainable_modules": trainable_module_names(model) if include_trainable else [],
              "trainable_params": {k: list(p.shape) for k, p in extra.items()}}
    return write_files(path, tensors, config)


# ---------------------------------------------------------------------------------------------------- loading
_TRAINABLE_FIX = "load it into the model it was saved from, or save it with include_trainable=False"


class _Refused(Exception):
    """One reason a module of the file does not fit the model: ``(kind, item at fault[, fix])``, the arguments of
    ``_Problems.add`` (whose fix defaults to saving the adapter again)."""


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The parsed, format-checked ``adapter_config.json`` of a native nlora adapter directory."""
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
        kind = ("a PEFT adapter (import it with nlora.import_peft)"
                if isinstance(config, dict) and "peft_type" in config else "not an nlora adapter")
        raise ValueError(f"{file} is {kind}; expected format {FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {config.get('format_version')!r}; this nlora reads "
                         f"{FORMAT_VERSION}: use the nlora version that wrote it")
    for key, kind in (("adapter_name", str), ("tensor_sha256", str), ("config", dict), ("modules", dict)):
        if not isinstance(config.get(key), kind) or (key == "modules" and not config[key]):
            raise ValueError(f"{file} is corrupted: {key!r} is missing or not a {kind.__name__}; {_SAVE_AGAIN}")
    return config


def _read_tensors(path: Path, config: dict) -> dict[str, Tensor]:
    file = path / TENSOR_NAME
    if not file.is_file():
        raise ValueError(f"{path} has no {TENSOR_NAME}: the adapter directory is incomplete; {_SAVE_AGAIN}")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != config["tensor_sha256"]:
        raise ValueError(f"{file} is corrupted or truncated (sha256 differs from the one recorded at save time, "
                         f"{len(data)} bytes); save the adapter again")
    try:
        return safetensors.torch.load(data)
    except Exception as err:  # noqa: BLE001 - a file whose hash matched but does not parse is corrupt
        raise ValueError(f"{file} could not be read ({type(err).__name__}: {err}); {_SAVE_AGAIN}") from None


class _Problems(dict):
    """Load problems by kind; ``raise_if_any`` adds the model's merged layers (an adapter cannot be added beside them)
    and turns the problems into one error that names every module and the fixes."""

    def add(self, kind: str, item: str, fix: str = _SAVE_AGAIN) -> None:
        self.setdefault((kind, fix), []).append(item)

    def add_each(self, kind: str, items: Iterable[str], fix: str = _SAVE_AGAIN) -> None:
        for item in items:
            self.add(kind, item, fix)

    def raise_if_any(self, name: str, path: Path, model: nn.Module, verb: str = "load") -> None:
        self.add_each("model has merged adapters", [n for n, layer in adapter_layers(model).items()
                                                    if layer.merged_adapters], "call nlora.unmerge(model) first")
        if self:
            lines = [f"  {kind}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''} -> {fix}"
                     for (kind, fix), items in self.items()]
            raise ValueError(f"cannot {verb} adapter {name!r} from {path} into {type(model).__name__}; nothing was "
                             f"changed:\n" + "\n".join(lines))


def _check_entry(name: str, rec: Any, default: dict, module: nn.Module) -> tuple[AdapterConfig, Tensor]:
    """The module's config from its entry and the ``(out, in)`` weight it goes on; refused: a damaged entry, or a
    module that is not a Linear/Conv1D of the saved kind and shape."""
    try:
        config = AdapterConfig.from_dict({**default, **rec["config"]})
        shape = rec["shape"]
        ok = (rec["kind"] in ("Linear", "Conv1D") and isinstance(shape, list) and len(shape) == 2
              and all(isinstance(d, int) and d > 0 for d in shape) and config.rank <= min(shape)
              and isinstance(rec["stored"], list) and isinstance(rec["from_base"], list))
    except (KeyError, ValueError, TypeError) as err:
        raise _Refused("has an invalid config entry", f"{name}: {err!r}") from None
    if not ok:
        raise _Refused("has an invalid config entry", f"{name}: kind {rec['kind']!r}, shape {shape!r}, rank "
                       f"{config.rank} and the tensor lists {rec['stored']!r}, {rec['from_base']!r} are not a valid "
                       f"layer")
    base = unwrap(module)
    if not is_adaptable(base):
        raise _Refused("is not a Linear/Conv1D in this model", f"{name} ({type(module).__name__})", _OTHER_MODEL)
    w, kind = dense_weight(base), "Conv1D" if is_conv1d(base) else "Linear"
    if kind != rec["kind"] or list(w.shape) != shape:
        raise _Refused("shape mismatch (wrong base model?)", f"{name}: saved {rec['kind']} (out, in) = "
                       f"{tuple(shape)}, model has {kind} {tuple(w.shape)}",
                       "load it into the base model it was trained on")
    return config, w.detach()


def _check_tensors(name: str, own: dict[str, Tensor], config: AdapterConfig, w: Tensor) -> tuple:
    """Shapes and dtypes of the module's tensors; returns its index sets ``(rows, cols)`` (``None`` if it has none)."""
    f = meta_factors(w.shape, config)  # the current (lora_) and the initial (init_) factors have these shapes
    expected = {"index": (2, config.rank), "base_sample": (SAMPLE_SIZE,),
                **{p + k: tuple(t.shape) for p in ("lora_", "init_") for k, t in zip("ANB", (f.A, f.N, f.B))
                   if t is not None}}
    for key, t in own.items():
        if tuple(t.shape) != expected.get(key):
            raise _Refused("rank/shape mismatch between file and config",
                           f"{name}.{key}: {tuple(t.shape)}, expected {expected.get(key)}")
        if key not in ("index", "base_sample") and t.dtype not in (config.adapter_dtype, w.dtype):
            raise _Refused("tensor dtype differs from the config", f"{name}.{key}: {t.dtype}")
    index = own.get("index")
    if index is None:
        return None, None
    if index.dtype not in (torch.int32, torch.int64) or (index < 0).any() or (index[0] >= w.shape[0]).any() or (
            index[1] >= w.shape[1]).any():
        raise _Refused("has invalid index sets", name)
    return index[0].to(w.device, torch.int64), index[1].to(w.device, torch.int64)


def _slices_from_base(name: str, rec: dict, config: AdapterConfig, w: Tensor, rows: Tensor | None,
                      cols: Tensor | None, check_base: bool) -> dict[str, Tensor]:
    """The factors a compact file left out, sliced again from the base weight and checked against the digest of the
    saved slices (or of their cast to the base's lower precision)."""
    if rows is None:
        raise _Refused("has invalid index sets", f"{name}: rebuilt from the base but no index stored")
    r, c = (t.to(w.dtype) for t in nystrom_slices(w, rows, cols))
    low = (rec.get("slice_digest_low") or {}).get(str(w.dtype)[6:])  # the base cast to a lower precision
    if (check_base and _digest(r.to(config.adapter_dtype), c.to(config.adapter_dtype)) != rec.get("slice_digest")
            and (low is None or _digest(r, c) != low)):
        raise _Refused("base weight slices differ from the ones saved (wrong base model, or a different "
                       "checkpoint)", name, "load the base checkpoint it was saved on (in its dtype or a "
                       "lower-precision cast of it), or pass check_base=False to put it on this one on purpose")
    return {k: (r if k.endswith("_A") else c) for k in rec["from_base"]}


def _plan_module(name: str, rec: Any, default: dict, tensors: dict[str, Tensor], module: nn.Module, adapter: str,
                 check_base: bool) -> tuple:
    """Check one module against the file: ``(config, initial factors, current factors)``, or ``_Refused``."""
    if isinstance(module, NLoRALinear) and adapter in module.adapters:
        raise _Refused("already has an adapter of that name", name,
                       "pass adapter='<new name>' to load it under another name, or nlora.delete_adapter first")
    config, w = _check_entry(name, rec, default, module)
    own = {k: tensors[f"{name}.{k}"].to(w.device) for k in rec["stored"] if f"{name}.{k}" in tensors}
    rows, cols = _check_tensors(name, own, config, w)
    now = weight_sample(w) if check_base and "base_sample" in own else None
    if now is not None and not same_sample(own["base_sample"], now):
        raise _Refused("base weight differs from the one the adapter was saved on (wrong base model, or a different "
                       "checkpoint)", name, "load the base checkpoint it was trained on, or pass check_base=False to "
                       "put it on this one on purpose")
    if rec["from_base"]:
        own.update(_slices_from_base(name, rec, config, w, rows, cols, check_base))
    prefix = "init_" if config.preserve_output else "lora_"
    if prefix + "A" not in own or prefix + "B" not in own:
        raise _Refused("file lacks tensors the config lists", f"{name}.{prefix}A/B")
    return (config, Factors(own[prefix + "A"], own.get(prefix + "N"), own[prefix + "B"], rows, cols),
            {k: own[k] for k in ("lora_A", "lora_N", "lora_B") if k in own})


def _check_keys(config: dict, tensors: dict[str, Tensor], problems: _Problems) -> None:
    """Every tensor in the file must be claimed by the config, and the other way round."""
    claimed = {f"{m}.{k}" for m, rec in config["modules"].items() if isinstance(rec, dict)
               for k in (rec.get("stored") if isinstance(rec.get("stored"), list) else [])}
    claimed |= {_TRAINABLE_PREFIX + k for k in config.get("trainable_params", {})}
    for kind, keys in (("file has tensors the config does not describe", set(tensors) - claimed),
                       ("file lacks tensors the config lists", claimed - set(tensors))):
        problems.add_each(kind, sorted(keys))


def _plan_trainable(model: nn.Module, config: dict, tensors: dict[str, Tensor],
                    problems: _Problems) -> tuple[list[nn.Module], list[tuple[nn.Parameter, Tensor]]]:
    """The modules trained in full that the file names, and their parameters with the saved values."""
    modules = {n.replace(".base.", ".").removesuffix(".base"): m for n, m in model.named_modules()}
    params = {n.replace(".base.", "."): p for n, p in model.named_parameters(remove_duplicate=False)}
    names = config.get("trainable_modules", [])
    problems.add_each("trainable module missing from the model", [n for n in names if n not in modules], _TRAINABLE_FIX)
    values = []
    for pname, shape in config.get("trainable_params", {}).items():
        p, t = params.get(pname), tensors.get(_TRAINABLE_PREFIX + pname)
        if p is None:
            problems.add("trainable parameter missing from the model", pname, _TRAINABLE_FIX)
        elif t is not None and (tuple(t.shape) != tuple(p.shape) or list(t.shape) != list(shape)):
            problems.add("trainable parameter shape mismatch",
                         f"{pname}: saved {tuple(t.shape)}, model {tuple(p.shape)}",
                         _TRAINABLE_FIX)
        elif t is not None:
            values.append((p, t))
    return [modules[n] for n in names if n in modules], values


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, *,
                 check_base: bool = True) -> nn.Module:
    """Attach the adapter saved at ``path`` to ``model`` (a fresh base model, or one holding other adapters) and make
    it the active adapter; returns ``model``.

    All-or-nothing: the file's checksum, every module, shape, rank, dtype and a sample of each base weight are checked
    before anything changes; any problem raises one ValueError naming the modules, and the model stays bit-identical.
    ``adapter`` renames the adapter. ``check_base=False`` skips the base-weight sample check, to put an adapter on
    another checkpoint of the same architecture on purpose; compact factors still need the same slices.
    """
    path = Path(path)
    config = read_adapter_config(path)
    tensors = _read_tensors(path, config)
    name = adapter or config["adapter_name"]
    problems = _Problems()
    _check_keys(config, tensors, problems)
    modules, plans = _candidates(model), {}
    for module_name, rec in config["modules"].items():
        try:
            if module_name not in modules:
                raise _Refused("missing from the model", module_name, _OTHER_MODEL)
            plans[module_name] = _plan_module(module_name, rec, config["config"], tensors, modules[module_name], name,
                                              check_base)
        except _Refused as refused:
            problems.add(*refused.args)
    extra_modules, copies = _plan_trainable(model, config, tensors, problems)  # copies: (parameter, saved value)
    problems.raise_if_any(name, path, model)
    for module_name, (adapter_config, initial, current) in plans.items():  # apply: nothing below can fail
        new = Adapter(adapter_config, initial)
        new.from_weight = check_base or bool(config["modules"][module_name]["from_base"])  # its A0, B0 are this W's
        wrap_layer(model, module_name, modules[module_name]).add(name, new)
        copies += [(p, current[k]) for k, p in new.named_parameters() if p.requires_grad and k in current]
    with torch.no_grad():
        for p, value in copies:
            p.copy_(value)
    for module in extra_modules:
        setattr(module, _TRAINABLE, True)
    set_adapter(model, name)
    return model
