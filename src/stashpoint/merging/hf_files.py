"""The files beside the weights that make a merged HF directory loadable.

mergekit copies the model configuration, the generation configuration and the
tokenizer of the base model (or of the first model when there is no base) into its
output and writes the merge configuration as ``mergekit_config.yml``; an HF merge
output gets the same here, so ``AutoModel.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)`` work on it.  Only regular files are copied
(a FIFO or a directory under one of these names is left alone), and ``config.json``
gets the output's dtype when every merged tensor has one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping

import torch

#: copied from the reference input when present
MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: the merge configuration, under mergekit's name (JSON text, which YAML readers accept)
CONFIG_FILE = "mergekit_config.yml"


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _with_dtype(text: str, dtype: torch.dtype) -> str:
    """``config.json`` with ``torch_dtype`` (and ``dtype``, if present) set to ``dtype``."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        return text
    word = str(dtype).removeprefix("torch.")  # transformers' spelling: float32, bfloat16
    doc["torch_dtype"] = word
    if "dtype" in doc:
        doc["dtype"] = word
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def copy_hf_files(
    out: str, reference: str | None, merge_config: Mapping[str, object], dtype: torch.dtype | None
) -> tuple[str, ...]:
    """Copy the model and tokenizer files of ``reference`` into ``out``; write the merge config.

    ``reference`` is the local directory of the base model (or the first model), or
    None when it is not an HF directory; ``dtype`` is the dtype of every merged
    tensor, or None when they differ.  Returns the names written, the config included.
    """
    written = []
    for name in (*MODEL_FILES, *TOKENIZER_FILES):
        dst = os.path.join(out, name)
        src = os.path.join(reference, name) if reference is not None else None
        if src is None or not _regular(src):
            if _regular(dst):  # left by an earlier output overwritten here: it belongs to another model
                os.remove(dst)
            continue
        if name == "config.json" and dtype is not None:
            with open(src, encoding="utf-8") as f:
                text = _with_dtype(f.read(), dtype)
            with open(dst, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            shutil.copyfile(src, dst)
        written.append(name)
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(merge_config, f, indent=2)
        f.write("\n")
    written.append(CONFIG_FILE)
    return tuple(written)
