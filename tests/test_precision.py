"""Mixed precision (bf16/fp16 base, fp32 adapter parameters by default, ``adapter_dtype``, ``torch.autocast``)
and HF gradient checkpointing on injected models."""

from __future__ import annotations

import pytest
import torch

import nlora

transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def batch():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))


def adapter_grads(model, x) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", ["nystrom", "slora"])
def test_low_precision_base_keeps_fp32_adapters(dtype, init):
    model = tiny_llama(dtype)
    nlora.inject(model, TARGETS, rank=4, init=init, seed=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base.weight.dtype == dtype  # the base stays as it is
    assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {torch.float32}  # the default
    if init == "nystrom":  # slices of the low-precision weight, upcast exactly
        assert torch.equal(layer.lora_A, layer.base.weight[:4].float())
        assert torch.equal(layer.lora_B, layer.base.weight[:, :4].float())
    x = batch()
    out = model(input_ids=x, labels=x)
    assert out.logits.dtype == dtype
    out.loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().max() > 0 for g in grads.values())
    # against the same model in fp32: low-precision rounding only
    ref = tiny_llama()
    nlora.inject(ref, TARGETS, rank=4, init=init, seed=0)
    ref_loss = ref(input_ids=x, labels=x).loss
    torch.testing.assert_close(out.loss.float(), ref_loss, rtol=2e-2, atol=0)


def test_adapter_dtype_option_and_compute_dtype():
    model = tiny_llama(torch.bfloat16)
    nlora.inject(model, TARGETS, rank=4, init="nystrom", adapter_dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {torch.bfloat16}
    model = tiny_llama(torch.bfloat16)
    nlora.inject(model, TARGETS, rank=4, init="slora", seed=0, compute_dtype=torch.float32)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    a = layer.adapters["default"]
    want = (x.float() @ a.lora_A.T @ a.lora_N.T @ a.lora_B.T * a.scaling)  # all in fp32
    torch.testing.assert_close(a(x), want, rtol=1e-6, atol=1e-6)
    assert layer(x).dtype == torch.bfloat16


def test_autocast_fp32_model_bf16_compute_fp32_grads():
    model = tiny_llama()
    nlora.inject(model, TARGETS, rank=4, init="slora", seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
    x = batch()
    ref_grads = adapter_grads(model, x)
    ref_loss = model(input_ids=x, labels=x).loss
    layer = model.model.layers[0].self_attn.v_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.adapters["default"](torch.randn(2, 32)).dtype == torch.bfloat16  # adapter matmuls in bf16
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.testing.assert_close(loss.float(), ref_loss, rtol=2e-2, atol=0)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, k
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=0.1, atol=0.05 * ref_grads[k].abs().max().item(),
                                       msg=k)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}])
@pytest.mark.parametrize("init,train", [("nystrom", "all"), ("nystrom", "middle"), ("slora", "all")])
def test_gradient_checkpointing_gives_the_same_gradients(kwargs, init, train):
    model = tiny_llama()
    nlora.inject(model, TARGETS, rank=4, init=init, train=train, seed=0)
    model.train()
    x = batch()
    plain = adapter_grads(model, x)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.is_gradient_checkpointing
    checkpointed = adapter_grads(model, x)
    assert plain.keys() == checkpointed.keys() and plain
    for k in plain:
        assert checkpointed[k] is not None, k
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)
