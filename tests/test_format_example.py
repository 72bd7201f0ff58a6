"""docs/FORMAT.md's worked example (§8) is what a real save writes, byte for byte.

The test runs the generator (scripts/format-example: two real ranks over gloo) and
compares its output with the doc, so any change to the format fails here until the doc
is regenerated.  The doc's own reading snippet is then run on the generated checkpoint.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "format-example"


def _generator():
    loader = importlib.machinery.SourceFileLoader("format_example", str(SCRIPT))
    spec = importlib.util.spec_from_loader("format_example", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_format_md_example_matches_a_fresh_run(tmp_path: Path) -> None:
    gen = _generator()
    ckpt = gen.run_example(tmp_path)
    doc = gen.DOC.read_text()
    assert gen.splice(doc, gen.render(ckpt)) == doc, "docs/FORMAT.md §8 is stale: run scripts/format-example"
    assert (ckpt / "index.json").read_text() in doc

    # the snippet that follows the example reads it with json, safetensors and crc32c only
    snippet = re.search(r"The following snippet.*?```python\n(.*?)```", doc, re.S).group(1)
    snippet = snippet.replace('"/path/to/checkpoint"', repr(str(ckpt)))
    scope: dict = {}
    exec(compile(snippet, "FORMAT.md §8", "exec"), scope)
    expected = torch.arange(8, dtype=torch.float32).reshape(4, 2)[2:]
    assert torch.equal(scope["a"], expected) and torch.equal(scope["b"], expected)
