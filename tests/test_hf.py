"""nlora.hf.SaveAdapterCallback with the real transformers Trainer (and TRL's SFTTrainer where TRL is installed):
the adapter lands in every checkpoint-N directory and in output_dir, and load_adapter restores the trained model."""

from __future__ import annotations

import sys

import pytest
import torch

import nlora

from .model_zoo import MODELS, one_thread  # noqa: F401 (autouse fixture)

transformers = pytest.importorskip("transformers")


def token_rows(n: int = 8, length: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 64, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def args(tmp_path, **extra):
    return transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, save_strategy="steps",
                                          per_device_train_batch_size=2, learning_rate=5e-2, report_to=[],
                                          use_cpu=True, disable_tqdm=True, logging_steps=100, **extra)


def test_import_nlora_imports_none_of_the_optional_integrations():
    import subprocess

    code = "import sys, nlora; sys.exit(any(m in sys.modules for m in ('transformers', 'peft', 'torchao', " \
           "'bitsandbytes')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_trainer_writes_the_adapter_into_checkpoints_and_output_dir(tmp_path):
    from nlora.hf import SaveAdapterCallback

    spec = MODELS["llama"]
    model = nlora.inject(spec.model(), "all-linear", rank=4, init="nystrom", preserve_output=True)
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=token_rows(),
                                   callbacks=[SaveAdapterCallback()])
    trainer.train()
    x = spec.inputs(torch.Generator().manual_seed(1))
    model.eval()
    want = spec.run(model, x)
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        assert (tmp_path / sub / "adapter_model.safetensors").is_file()
    restored = nlora.load_adapter(spec.model(), tmp_path)
    torch.testing.assert_close(spec.run(restored, x), want, rtol=0, atol=0)
    early = nlora.load_adapter(spec.model(), tmp_path / "checkpoint-2")
    assert not torch.equal(spec.run(early, x), want)  # the step-2 adapter, not the final one


def test_trl_sft_trainer_writes_the_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from nlora.hf import SaveAdapterCallback

    spec = MODELS["llama"]
    model = nlora.inject(spec.model(), "all-linear", rank=4, init="nystrom", train="middle")
    rows = [{"input_ids": r["input_ids"].tolist()} for r in token_rows()]
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                           learning_rate=5e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100,
                           bf16=False)  # TRL's default autocasts the trained model's forward to bf16
    tokenizer = _tiny_tokenizer()
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[SaveAdapterCallback()])
    trainer.train()
    x = spec.inputs(torch.Generator().manual_seed(1))
    model.eval()
    restored = nlora.load_adapter(spec.model(), tmp_path)
    torch.testing.assert_close(spec.run(restored, x), spec.run(model, x), rtol=0, atol=0)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()


def _tiny_tokenizer():
    """A word-level tokenizer over the tiny Llama's 64 ids (pad 2), built offline."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(64)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t2", eos_token="t1", bos_token="t0")


def test_save_adapter_callback_refuses_an_unclear_adapter_before_training():
    from nlora.hf import SaveAdapterCallback

    model = nlora.inject(MODELS["llama"].model(), "all-linear", rank=2, init="lora")
    nlora.inject(model, "all-linear", rank=2, init="slora", adapter="other")
    with pytest.raises(ValueError, match=r"^SaveAdapterCallback: the model holds several adapters \['default', "
                                         r"'other'\]; pass adapter=<name>"):
        SaveAdapterCallback().on_train_begin(None, None, None, model=model)
    with pytest.raises(ValueError, match=r"^SaveAdapterCallback: no adapter named 'typo'"):
        SaveAdapterCallback(adapter="typo").on_train_begin(None, None, None, model=model)
    SaveAdapterCallback(adapter="other").on_train_begin(None, None, None, model=model)


def test_save_adapter_callback_refuses_a_non_string_adapter_name_before_training():
    """SaveAdapterCallback(adapter=("other",)) names no adapter: refused when training begins (b79a82d), not accepted
    there and failing at the first checkpoint (save_adapter's StopIteration)."""
    from nlora.hf import SaveAdapterCallback

    model = nlora.inject(MODELS["llama"].model(), "all-linear", rank=2, init="lora")
    nlora.inject(model, "all-linear", rank=2, init="slora", adapter="other")
    with pytest.raises(ValueError, match=r"^SaveAdapterCallback: no adapter named \('other',\)"):
        SaveAdapterCallback(adapter=("other",)).on_train_begin(None, None, None, model=model)
