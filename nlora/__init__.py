"""nlora: SLoRA, NLoRA (Nyström-initialised three-matrix LoRA) and IntTune for any PyTorch model."""

from .checkpoint import load_adapter, read_adapter_config, save_adapter
from .config import AdapterConfig
from .deferred import initialize_adapters, pending_adapters, remap_base_keys
from .inits import INITIALIZERS, Factors, get_init, register_init, register_many
from .layer import Adapter, NLoRALinear
from .model import (adapter_layers, adapter_names, count_parameters, delete_adapter, disable_adapter, inject, merge,
                    merge_and_unload, select_targets, set_adapter, trainable_summary, unload, unmerge)
from .nystrom import nystrom_reconstruct, optimal_core, regularised_pinv, select_indices, truncated_pinv
from .peft import export_peft, import_peft
from .route import route

__version__ = "0.2.0"

__all__ = [
    "Adapter", "AdapterConfig", "Factors", "INITIALIZERS", "NLoRALinear", "adapter_layers", "adapter_names",
    "count_parameters", "delete_adapter", "disable_adapter", "export_peft", "get_init", "import_peft",
    "initialize_adapters",
    "inject", "load_adapter", "merge", "merge_and_unload", "nystrom_reconstruct", "optimal_core", "pending_adapters",
    "read_adapter_config", "register_init", "register_many", "regularised_pinv", "remap_base_keys", "route",
    "save_adapter", "select_indices", "select_targets", "set_adapter", "trainable_summary", "truncated_pinv", "unload",
    "unmerge",
]
