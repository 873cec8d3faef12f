"""HF ``transformers.Trainer`` / TRL integration. Importing this module imports transformers; ``import nlora`` does
not import it."""

from __future__ import annotations

from transformers import TrainerCallback

from .checkpoint import _resolve, save_adapter


class SaveAdapterCallback(TrainerCallback):
    """Writes the nlora adapter next to the Trainer's own files: into every ``checkpoint-N`` directory it saves, and
    into ``output_dir`` at the end of training. ``nlora.load_adapter(base_model, output_dir)`` (or a checkpoint
    directory) then restores the trained model; ``resume_from_checkpoint`` works as without it.

    ``adapter``: which adapter to write when the model holds several (default: its only one). Only the main process
    writes. A model without nlora adapters, an unclear or unknown ``adapter``, or one ``save_adapter`` refuses (merged,
    or injected on meta and not yet initialised) is refused when training begins.
    """

    def __init__(self, adapter: str | None = None) -> None:
        self.adapter = adapter

    def _write(self, model, path: str, state) -> None:
        if state is None or state.is_world_process_zero:
            save_adapter(getattr(model, "module", model), path, adapter=self.adapter)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        try:  # the adapter to write must be clear now, not at the first checkpoint
            _resolve(getattr(model, "module", model), self.adapter, "save")
        except ValueError as err:
            raise ValueError(f"SaveAdapterCallback: {err} (before building the Trainer)") from None

    def on_save(self, args, state, control, model=None, **kwargs):
        self._write(model, f"{args.output_dir}/checkpoint-{state.global_step}", state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(model, args.output_dir, state)
