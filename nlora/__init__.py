"""nlora: SLoRA, NLoRA (Nyström-initialised three-matrix LoRA) and IntTune for any PyTorch model."""

from .deferred import initialize_adapters, pending_adapters, remap_base_keys
from .inits import INITIALIZERS, Factors, get_init, register_init, register_many
from .io import export_peft, load_adapter, save_adapter
from .layer import Adapter, NLoRALinear
from .model import (
    adapter_names,
    count_parameters,
    delete_adapter,
    disable_adapter,
    inject,
    merge,
    merge_and_unload,
    select_targets,
    set_adapter,
    trainable_summary,
    unload,
    unmerge,
)
from .nystrom import nystrom_reconstruct, optimal_core, regularised_pinv, ridge_pinv, select_indices

__version__ = "0.1.0"

__all__ = [
    "Adapter", "Factors", "INITIALIZERS", "NLoRALinear", "adapter_names", "count_parameters", "delete_adapter",
    "disable_adapter", "get_init", "initialize_adapters", "inject", "merge", "merge_and_unload",
    "nystrom_reconstruct", "optimal_core", "pending_adapters", "register_init", "register_many", "regularised_pinv",
    "remap_base_keys", "ridge_pinv", "select_indices", "select_targets", "set_adapter", "trainable_summary",
    "unload", "unmerge",
    "export_peft", "load_adapter", "save_adapter",
]
