"""Shared helpers for the benchmarks: clocks that synchronise, robust summaries, machine info, tables and JSON."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# LLaMA-style shapes used across the benchmarks.
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               num_hidden_layers=32, vocab_size=32000),  # LLaMA-2-7B
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
               num_hidden_layers=22, vocab_size=32000),  # TinyLlama-1.1B
}


def sync(device: torch.device | str) -> None:
    """Wait for queued device work, so that a host clock read afterwards means something."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """Wall time of ``fn()`` in seconds, synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def summary(values: Sequence[float]) -> dict:
    """Median, min, max and every sample (for the JSON), so spread is visible."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals), "samples": vals}


def cuda_step_times(step: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Per-step device times in ms, from CUDA events around each call (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def cpu_step_times(step: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Per-call wall times in ms on the CPU (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        step()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def free_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, so one measurement does not inherit another's memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    """``$NLORA_COMMIT`` if set (a copied checkout, e.g. on the lent GPU machine, can report a stale HEAD), else
    the repository's HEAD."""
    if os.environ.get("NLORA_COMMIT"):
        return os.environ["NLORA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device | str) -> dict:
    """Where and with what a result was measured: host, CPU, GPU, library versions, date, exact command."""
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": version("peft"),
        "transformers": version("transformers"),
        "nlora_commit": os.environ.get("NLORA_COMMIT") or _git_commit(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def results_dir() -> Path:
    """``$NLORA_RESULTS`` if set (the GPU runs write under ``$OUT``), else ``benchmarks/results``."""
    path = Path(os.environ.get("NLORA_RESULTS", RESULTS))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` as ``<results>/<name>.json`` and say where."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table (floats to 4 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    body = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def llama_config(shape: str, layers: int | None = None, **overrides):
    """A ``LlamaConfig`` of one of ``SHAPES`` (optionally fewer layers), eager attention unless overridden."""
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_llama(config, device: str, dtype: torch.dtype, seed: int = 0, causal_lm: bool = False):
    """A randomly initialised ``LlamaModel`` (or ``LlamaForCausalLM``) built directly on ``device`` in ``dtype``."""
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    return model.eval()
