"""The README's unit-level snippet runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_unit_level_snippet_runs_as_written():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"Unit-level use in research code \(runs as written\):\n\n```python\n(.*?)```", text, re.S)
    assert block is not None, "the README lost its unit-level snippet"
    scope: dict = {}
    exec(compile(block.group(1), str(README), "exec"), scope)  # noqa: S102 - our own README
    layer, factors = scope["layer"], scope["factors"]
    assert tuple(layer.lora_A.shape) == (16, 512) and tuple(layer.lora_B.shape) == (256, 16)
    assert tuple(scope["y"].shape) == (4, 256) and tuple(factors.N.shape) == (16, 16)
