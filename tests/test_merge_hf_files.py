"""A merged HF directory opens with transformers' ``from_pretrained`` (model and tokenizer)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import stashpoint
from stashpoint.merging import parse_config
from stashpoint.merging.hf_files import CONFIG_FILE

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = ["[UNK]", "[PAD]", "hello", "world", "merge", "the", "models", "tiny"]


def _config():
    return transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )


def _tokenizer():
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _save(path, seed: int, tokenizer=None):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_config())
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merged_hf_output_loads_with_from_pretrained_and_gives_the_merged_logits(tmp_path):
    tok = _tokenizer()
    a = _save(tmp_path / "a", 1, tok)
    b = _save(tmp_path / "b", 2)
    os.mkfifo(tmp_path / "a" / "vocab.txt")  # a special file under a tokenizer name: skipped, no hang
    out = tmp_path / "merged"
    report = stashpoint.merge(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tmp_path / "a"), "parameters": {"weight": 0.3}},
                {"model": str(tmp_path / "b"), "parameters": {"weight": 0.7}},
            ],
            "output_format": "hf",
        },
        out,
    )
    assert report.merged
    names = set(os.listdir(out))
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        CONFIG_FILE,
    } <= names
    assert "vocab.txt" not in names
    # the merge configuration written beside the weights reads back as the same merge
    doc = json.loads((out / CONFIG_FILE).read_text())
    assert parse_config(doc).method == "linear" and [
        m.parameters["weight"] for m in parse_config(doc).models
    ] == [
        0.3,
        0.7,
    ]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"

    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    want = transformers.LlamaForCausalLM(_config()).eval()
    want.load_state_dict({k: 0.3 * a[k] + 0.7 * b[k] for k in a})
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        got_logits, want_logits = merged(ids).logits, want(ids).logits
    assert (got_logits - want_logits).abs().max() < 1e-5
    assert merged.generation_config.max_new_tokens == 7
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded("hello tiny models")["input_ids"] == tok("hello tiny models")["input_ids"] == [2, 7, 6]


def test_side_files_come_from_the_base_and_a_stashpoint_base_gives_only_the_config(tmp_path):
    _save(tmp_path / "base", 3, _tokenizer())
    _save(tmp_path / "ft", 4)
    out = tmp_path / "ta"
    stashpoint.merge(
        out=out,
        method="task_arithmetic",
        base_model=tmp_path / "base",
        models=[tmp_path / "ft"],
        output_format="hf",
        out_dtype="bfloat16",
    )
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # a stashpoint checkpoint as the reference: no HF files to copy, the merge config still written
    ckpt = tmp_path / "ckpt"
    stashpoint.save({"model": {"w": torch.ones(3)}}, ckpt)
    stashpoint.save({"model": {"w": torch.zeros(3)}}, tmp_path / "ckpt2")
    out2 = tmp_path / "plain"
    stashpoint.merge(out=out2, method="uniform", models=[ckpt, tmp_path / "ckpt2"], output_format="hf")
    assert sorted(n for n in os.listdir(out2) if not n.endswith(".safetensors")) == [CONFIG_FILE]
