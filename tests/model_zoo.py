"""Tiny CPU models for the behaviour battery and the parity tests: an MLP and HF Llama / BERT / GPT-2 from configs.

Each ``ModelSpec`` says how to build the model (cached, handed out as deep copies), how to make inputs, how to run
it to one float tensor, which targets the battery injects and which module names that must wrap.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.utils.checkpoint
from torch import nn


class Block(nn.Module):
    """``gelu(fc(x))``: one block of the MLP, so that ``layers.N.`` names and checkpointing exist."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.fc(x))


class MLP(nn.Module):
    """A 24 -> 40 -> 16 -> 5 MLP (out != in everywhere) with optional activation checkpointing per block."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(24, 40), Block(40, 16)])
        self.head = nn.Linear(16, 5)
        self.checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        self.checkpointing = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.head(x)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict]
    targets: object  # what the battery passes to inject
    wrapped: tuple[str, ...]  # the exact module names those targets must wrap

    def model(self) -> nn.Module:
        """A fresh deep copy of the cached pristine model (eval mode, seed-fixed weights)."""
        return copy.deepcopy(_pristine(self.name))

    def run(self, model: nn.Module, inputs: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model's output tensor (logits for HF models); float inputs are cast to ``dtype`` if given."""
        if dtype is not None:
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.logits


def _hf():
    return pytest.importorskip("transformers")


def _mlp() -> nn.Module:
    return MLP()


def _llama() -> nn.Module:
    t = _hf()
    cfg = t.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, max_position_embeddings=16, bos_token_id=0,
                        eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    return t.LlamaForCausalLM(cfg)


def _bert() -> nn.Module:
    t = _hf()
    cfg = t.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=0)
    return t.BertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    t = _hf()
    cfg = t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)
    return t.GPT2LMHeadModel(cfg)


def _ids(generator: torch.Generator) -> dict:
    return {"input_ids": torch.randint(3, 64, (2, 6), generator=generator)}


def _bert_inputs(generator: torch.Generator) -> dict:
    ids = torch.randint(3, 64, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded sequence, so the attention mask is exercised
    return {"input_ids": ids, "attention_mask": mask}


_BUILDERS = {"mlp": _mlp, "llama": _llama, "bert": _bert, "gpt2": _gpt2}


def pristine(name: str) -> nn.Module:
    """The cached untouched model itself (read it, never modify it)."""
    return _pristine(name)


@functools.lru_cache(maxsize=None)
def _pristine(name: str) -> nn.Module:
    torch.manual_seed(1234)
    return _BUILDERS[name]().eval()


def _block_names(prefix: str, n: int, leaves: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}.{leaf}" for i in range(n) for leaf in leaves)


MODELS = {
    "mlp": ModelSpec("mlp", _mlp, lambda g: {"x": torch.randn(3, 24, generator=g)}, ["fc"],
                     ("layers.0.fc", "layers.1.fc")),
    "llama": ModelSpec("llama", _llama, _ids, "all-linear",
                       _block_names("model.layers", 2, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                        "mlp.down_proj"))),
    "bert": ModelSpec("bert", _bert, _bert_inputs, ["query", "value"],
                      _block_names("bert.encoder.layer", 2, ("attention.self.query", "attention.self.value"))),
    "gpt2": ModelSpec("gpt2", _gpt2, _ids, "all-linear",
                      _block_names("transformer.h", 2, ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))),
}


@functools.lru_cache(maxsize=None)
def fp16_supported(name: str) -> bool:
    """Whether this CPU build runs the model in fp16 (older CPU kernels lack some Half ops)."""
    spec = MODELS[name]
    try:
        with torch.no_grad():
            out = spec.run(spec.model().half(), spec.inputs(torch.Generator().manual_seed(0)), torch.float16)
        return bool(torch.isfinite(out).all())
    except RuntimeError:
        return False


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine OpenMP barriers made an MKL SVD of a
    128 x 32 matrix take 0.5 s instead of 0.2 ms (battery: 249 s with 2 threads, 12 s with 1). Import it into a test
    module to run that module single-threaded; the previous setting comes back afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
