"""The GSM study helpers: answer scoring, template split, encoding, the grid, and one end-to-end run on a tiny
random Llama with a character-level tokenizer (no SmolLM2, no reasoning-gym needed)."""

import argparse
import json

import pytest
import torch

gsm = pytest.importorskip("experiments.gsm_smollm")
gsm_data = pytest.importorskip("experiments.gsm_data")
study = pytest.importorskip("experiments.study")


@pytest.mark.parametrize("text, answer, ok", [
    ("2 + 3 = 5 apples\n#### 5", "5", True),
    ("so 1,200 + 34 = 1,234\n#### 1,234", "1234", True),
    ("#### 12.0 dollars", "12", True),
    ("a is 4, b is 7\n#### 8", "7", False),  # the number after #### counts, not any number
    ("the answer is 42", "42", True),  # no ####: the last number
    ("the answer is 42, not 41", "42", False),
    ("#### -3", "-3", True),
    ("no number at all", "0", False),
])
def test_exact_match_reads_the_number_after_the_marker(text, answer, ok):
    assert gsm.is_correct(text, answer) is ok


def test_template_split_is_disjoint_fixed_and_complete():
    templates = list(range(85))
    a, b = gsm_data.template_split(templates, 15), gsm_data.template_split(templates, 15)
    assert a == b
    assert [len(a[k]) for k in ("test", "train")] == [15, 70]
    assert a["test"] | a["train"] == set(templates) and not a["test"] & a["train"]
    with pytest.raises(ValueError, match="leave none"):
        gsm_data.template_split(templates, 85)


def test_zero_shot_runs_once_and_the_grid_is_seed_major():
    lrs = {"zero-shot": [0.0], "lora": [1e-4, 1e-3]}
    grid = study.jobs(["zero-shot", "lora"], [0, 1], lrs)
    assert grid == [{"method": "zero-shot", "lr": 0.0, "seed": 0}, {"method": "lora", "lr": 1e-4, "seed": 0},
                    {"method": "lora", "lr": 1e-3, "seed": 0}, {"method": "lora", "lr": 1e-4, "seed": 1},
                    {"method": "lora", "lr": 1e-3, "seed": 1}]


def test_every_method_names_a_registered_init():
    import nlora

    for m in gsm.METHODS.values():
        assert m.init is None or m.init in nlora.INITIALIZERS
        assert gsm.LRS[m.name]
    assert gsm.METHODS["inttune"].train == "middle" and gsm.METHODS["inttune"].lr_mult == 10


def _char_tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?#+-=*/\n"))
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                                unk_token="<unk>")


PROBLEMS = [{"question": f"What is {a} + {b}?", "cot": f"{a} + {b} = {a + b}\n#### {a + b}", "answer": str(a + b),
             "template": 0} for a, b in [(1, 2), (3, 4), (5, 6), (2, 2), (7, 1), (4, 4)]]


def test_encode_scores_only_the_solution_tokens():
    tok = _char_tokenizer()
    enc = gsm.encode(tok, PROBLEMS[:2], max_len=64)
    for i, p in enumerate(PROBLEMS[:2]):
        n_prompt = len(tok(gsm.PROMPT.format(question=p["question"]))["input_ids"])
        n = int(enc.lengths[i])
        assert (enc.labels[i, :n_prompt] == -100).all() and (enc.labels[i, n:] == -100).all()
        assert torch.equal(enc.labels[i, n_prompt:n], enc.ids[i, n_prompt:n])
        assert tok.decode(enc.ids[i, n_prompt:n - 1]) == p["cot"] and enc.ids[i, n - 1] == tok.eos_token_id
    ids, mask, labels = enc.batch(torch.tensor([0, 1]), torch.device("cpu"))
    assert ids.shape[1] == int(enc.lengths.max()) and mask.sum() == enc.lengths.sum()


@pytest.mark.parametrize("name", ["zero-shot", "norms-only", "lora", "nlora", "inttune"])
def test_build_train_and_score_a_tiny_llama(name):
    """build() + train_run() + solution_nll() + exact_match() on a 2-layer random Llama: the right parameters
    train, the loss is finite, NLL matches the training loss definition, generation is scored."""
    transformers = pytest.importorskip("transformers")
    import nlora

    tok = _char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, _ = gsm.build(gsm.METHODS[name], model, rank=4, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if name == "zero-shot":
        assert not trainable
    elif name == "norms-only":
        assert trainable and all(n.endswith("norm.weight") for n in trainable)
    elif name == "inttune":
        assert trainable and all(n.endswith("lora_N") for n in trainable)
    else:
        assert len(nlora.adapter_layers(model)) == 2 * 7
    data = gsm.encode(tok, PROBLEMS, max_len=64)
    dev = torch.device("cpu")
    steps = 0 if name == "zero-shot" else 3
    res = gsm.train_run(model, data, steps=steps, batch=2, lr=1e-3, seed=0, device=dev)
    assert len(res["losses"]) == steps and all(torch.isfinite(torch.tensor(res["losses"])))
    if name == "zero-shot":  # nothing trained, nothing changed
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    nll = gsm.solution_nll(model, data, dev, batch=4)
    ids, mask, labels = data.batch(torch.arange(len(data)), dev)
    with torch.no_grad():
        ref = gsm.lm_loss(model, ids, mask, labels)
    assert nll == pytest.approx(float(ref), rel=1e-4)
    em, outs = gsm.exact_match(model, tok, PROBLEMS[:3], dev, max_new_tokens=4, batch=2)
    assert len(outs) == 3 and 0.0 <= em <= 1.0
    assert em == sum(gsm.is_correct(o, p["answer"]) for o, p in zip(outs, PROBLEMS[:3])) / 3


def test_aggregate_handles_a_zero_shot_row_and_picks_lr_on_validation(tmp_path, monkeypatch):
    try:  # the plots need the bench extra (matplotlib); the aggregation is tested without it
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
        monkeypatch.setattr(study, "plot", lambda *a, **k: None)
        monkeypatch.setattr(study, "plot_sweep", lambda *a, **k: None)
    rows = [{"method": "zero-shot", "lr": 0.0, "seed": 0, "init_s": 0.0, "init_rel_change": 0.0, "trainable": 0,
             "losses": [], "val_acc": 0.01, "test_acc": 0.0, "val_nll": 2.0, "test_nll": 2.1}]
    for lr, val in [(1e-4, 0.05), (1e-3, 0.10)]:
        for seed in (0, 1):
            rows.append({"method": "lora", "lr": lr, "seed": seed, "init_s": 0.01, "init_rel_change": 0.0,
                         "trainable": 100, "losses": [2.0 - 0.01 * i for i in range(40)], "val_acc": val,
                         "test_acc": val / 2, "val_nll": 1.0, "test_nll": 1.1, "s_per_step": 0.1})
    meta = {"task": "gsm", "rank": 4, "steps": 40, "batch": 2, "seeds": [0, 1], "device_name": "cpu"}
    result = study.aggregate(rows, meta, tmp_path, "t")
    table = {t["method"]: t for t in result["table"]}
    assert table["lora"]["best_lr"] == 1e-3 and table["lora"]["test_acc"][0] == pytest.approx(0.05)
    assert table["zero-shot"]["seeds"] == 1 and table["zero-shot"]["steps_to_lora_loss"] is None
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["table"][0]["method"] == "zero-shot" and (tmp_path / "t_curves.png").exists() == plots


def test_best_lrs_prefers_the_better_validation_metric_then_nll():
    rows = [{"method": m, "lr": lr, "seed": 0, "val_acc": acc, "val_nll": nll, "test_acc": 0.0, "losses": [1.0]}
            for m, lr, acc, nll in [("lora", 1e-4, 0.2, 1.0), ("lora", 1e-3, 0.3, 1.5),
                                    ("nlora", 1e-4, 0.1, 0.9), ("nlora", 1e-3, 0.1, 0.8)]]
    assert study.best_lrs(rows) == {"lora": [1e-3], "nlora": [1e-3]}
