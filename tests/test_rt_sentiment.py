"""The study/demo helpers: data parsing, split, schedule and convergence measures (no model, no download)."""

import bz2
import csv
import math

import pytest
import torch

rt = pytest.importorskip("experiments.rt_sentiment")


def test_load_drops_plot_rows_and_labels_fresh_as_1(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        w.writerows([["fresh", "great, fun", "a", "True"], ["plot", "a man walks", "a", "True"],
                     ["rotten", 'dull, "flat"', "b", "False"]])
    texts, labels = rt.load_rotten_tomatoes(path)
    assert texts == ["great, fun", 'dull, "flat"'] and labels == [1, 0]


def test_load_rejects_a_file_without_reviews(tmp_path):
    path = tmp_path / "x.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write("category,text\nplot,abc\n")
    with pytest.raises(ValueError, match="no fresh/rotten rows"):
        rt.load_rotten_tomatoes(path)


def test_split_is_a_fixed_partition():
    a, b = rt.split_indices(100, 20, 10), rt.split_indices(100, 20, 10)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("test", "val", "train")] == [20, 10, 70]
    assert sorted(torch.cat(list(a.values())).tolist()) == list(range(100))


def test_schedule_warms_up_then_decays_to_zero():
    f = [rt.lr_at(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(1 / 3) and f[2] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[2:], f[3:])) and f[-1] < 1e-3


def test_smooth_and_steps_to_reach_against_a_direct_computation():
    losses = [math.exp(-i / 30) + 0.05 * ((-1) ** i) for i in range(200)]
    sm = rt.smooth(losses, 7)
    for i in (0, 3, 6, 50, 199):
        lo = max(0, i - 6)
        assert sm[i] == pytest.approx(sum(losses[lo:i + 1]) / (i + 1 - lo))
    target = 0.2
    hit = rt.steps_to_reach(losses, target, 7)
    assert sm[hit - 1] <= target and all(x > target for x in sm[6:hit - 1])
    assert rt.steps_to_reach(losses, -1.0, 7) is None
    assert rt.final_loss(list(range(100))) == pytest.approx(sum(range(90, 100)) / 10)


def test_every_method_names_a_registered_init():
    nlora = pytest.importorskip("nlora")
    for m in rt.METHODS.values():
        assert m.init is None or m.init in nlora.INITIALIZERS
    assert rt.METHODS["inttune"].train == "middle" and rt.METHODS["inttune"].lr_mult == 10


@pytest.mark.parametrize("name", ["head-only", "lora", "nlora", "inttune"])
def test_build_and_train_a_tiny_bert(name):
    """build() + train_run() on a 2-layer random BERT: the right parameters train, the rest stays put."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    encoder = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    model, _ = rt.build(rt.METHODS[name], encoder, rank=4, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    if name == "head-only":
        assert trainable == {"head.weight", "head.bias"}
    elif name == "inttune":
        assert all(n.startswith("head.") or n.endswith("lora_N") for n in trainable)
    else:
        assert any(n.endswith("lora_A") for n in trainable)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (64, 12), generator=g)
    lengths = torch.randint(3, 13, (64,), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()
    labels = (ids[:, 0] > 25).long()  # learnable from the first token
    data = rt.Encoded(ids * mask, mask, lengths, labels)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = rt.train_run(model, data, steps=30, batch=16, lr=1e-2, seed=0, device=torch.device("cpu"),
                       evals={"train": data})
    assert all(math.isfinite(x) for x in res["losses"]) and 0.0 <= res["train_acc"] <= 1.0
    assert rt.final_loss(res["losses"]) < res["losses"][0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    base = {k.replace(".base.", "."): v for k, v in model.encoder.state_dict().items()
            if "lora_" not in k and "init_" not in k and not k.endswith((".rows", ".cols"))}
    assert all(torch.equal(base[k], frozen[k]) for k in frozen), "a frozen encoder weight moved"
