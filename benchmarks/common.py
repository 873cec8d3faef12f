"""What the benchmark scripts share: the record of the machine a run was on, and the plotting set-up."""

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import nlora  # noqa: E402


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: str = "cpu") -> dict:
    """Where and with what this ran: the command line, CPU, GPU, core count, load, library versions, git commit
    (``$NLORA_COMMIT`` where the checkout's git metadata is not the code's, as on the GPU machine)."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return {"command": shlex.join(["python3", *sys.argv]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "cuda": torch.version.cuda,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"), "peft": _version("peft"), "nlora": nlora.__version__,
            "nlora_commit": os.environ.get("NLORA_COMMIT") or git.stdout.strip() or None}


def sync(device: str) -> None:
    """Wait for the GPU (nothing to wait for on the CPU), so that a wall-clock reading covers the queued work."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_rounds(models: dict, batch, step, args, device: str, warmup: int = 3) -> dict[str, list[float]]:
    """ms per ``step(model, optimizer, batch)`` of every variant (``{name: (model, optimizer)}``), one entry per round:
    ``warmup`` steps of each, then ``args.rounds`` rounds of ``args.steps`` steps going round-robin over them."""
    for model, opt in models.values():
        for _ in range(warmup):
            step(model, opt, batch)
    ms = {n: [] for n in models}
    for _ in range(args.rounds):
        for n, (model, opt) in models.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, batch)
            sync(device)
            ms[n].append((time.perf_counter() - t0) * 1e3 / args.steps)
    return ms


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported only when a script draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Lay out, write as PNG and close one figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def write(result: dict, out: Path, name: str, plot) -> None:
    """Write ``<name>.json`` and, by ``plot(result, path)``, ``<name>.png`` into the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{name}.png")
    print(f"\nwrote {out / name}.json and .png")
