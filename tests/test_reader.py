"""verify on large and padded checkpoints; tied weights stored once (transformers, safetensors)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_model

import stashpoint
from stashpoint import errors
from stashpoint.convert import import_hf, load_hf
from stashpoint.engine.verify import verify_checkpoint


def test_verify_accepts_a_checkpoint_whose_header_is_over_64_kib(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(1500)])
    stashpoint.save({"model": model}, tmp_path / "c")
    (name,) = [n for n in os.listdir(tmp_path / "c") if n.endswith(".safetensors")]
    header_len = int.from_bytes((tmp_path / "c" / name).read_bytes()[:8], "little")
    assert header_len > 1 << 16
    report = verify_checkpoint(str(tmp_path / "c"))
    assert report.ok, report.problems[:3]
    assert report.chunks == 3000


def test_verify_reports_bytes_appended_after_the_last_chunk(tmp_path):
    stashpoint.save({"w": torch.arange(10.0)}, tmp_path / "c")
    (name,) = [n for n in os.listdir(tmp_path / "c") if n.endswith(".safetensors")]
    assert verify_checkpoint(str(tmp_path / "c")).ok
    with open(tmp_path / "c" / name, "ab") as f:
        f.write(b"extra")
    report = verify_checkpoint(str(tmp_path / "c"))
    assert not report.ok
    assert any("5 bytes after its last chunk" in p for p in report.problems)


def test_verify_reports_a_header_longer_than_its_file(tmp_path):
    stashpoint.save({"w": torch.arange(10.0)}, tmp_path / "c")
    (name,) = [n for n in os.listdir(tmp_path / "c") if n.endswith(".safetensors")]
    data = bytearray((tmp_path / "c" / name).read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    (tmp_path / "c" / name).write_bytes(data)
    report = verify_checkpoint(str(tmp_path / "c"))
    assert any("too short for its safetensors header" in p for p in report.problems)


def _llama(tied: bool, seed: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model):
    tokens = torch.arange(12).reshape(2, 6) % 61
    with torch.no_grad():
        return model(tokens).logits


def test_load_hf_fills_tied_weights_stored_once_by_save_pretrained(tmp_path):
    model = _llama(tied=True, seed=0)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = _llama(tied=True, seed=1)
    assert not torch.equal(_logits(fresh), _logits(model))
    load_hf(fresh, tmp_path / "hf")
    assert torch.equal(_logits(fresh), _logits(model))


def test_load_hf_ties_by_the_config_when_the_target_is_not_tied(tmp_path):
    model = _llama(tied=True, seed=0)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    untied = _llama(tied=False, seed=1)
    load_hf(untied, tmp_path / "hf")
    assert torch.equal(untied.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(_logits(untied), _logits(model))


def test_tied_weights_stored_once_by_safetensors_save_model(tmp_path):
    model = _llama(tied=True, seed=0)
    (tmp_path / "hf").mkdir()
    save_model(model, str(tmp_path / "hf" / "model.safetensors"))
    fresh = _llama(tied=True, seed=1)
    load_hf(fresh, tmp_path / "hf")
    assert torch.equal(_logits(fresh), _logits(model))


def test_an_import_of_tied_weights_loads_into_the_model(tmp_path):
    model = _llama(tied=True, seed=0)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    fresh = _llama(tied=True, seed=1)
    stashpoint.load({"model": fresh}, tmp_path / "ckpt")
    assert torch.equal(_logits(fresh), _logits(model))


def test_load_of_an_hf_directory_points_to_load_hf(tmp_path):
    model = _llama(tied=True, seed=0)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with pytest.raises(errors.MissingKeyError, match="load_hf"):
        stashpoint.load({"model": _llama(tied=True, seed=1)}, tmp_path / "hf")


def test_hf_export_writes_a_tied_weight_once_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from stashpoint.convert import export_hf

    model = _llama(tied=True, seed=0)
    stashpoint.save({"model": model}, tmp_path / "ckpt")
    model.config.save_pretrained(tmp_path / "cfg")
    summary = export_hf(tmp_path / "ckpt", tmp_path / "hf", copy_files=(tmp_path / "cfg" / "config.json",))
    written = load_file(tmp_path / "hf" / "model.safetensors")
    model.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    assert written.keys() == load_file(tmp_path / "theirs" / "model.safetensors").keys()
    assert "lm_head.weight" not in written and "model.lm_head.weight" in summary.skipped
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(loaded), _logits(model))
    # without a config saying so, nothing is left out
    export_hf(tmp_path / "ckpt", tmp_path / "plain")
    assert "lm_head.weight" in load_file(tmp_path / "plain" / "model.safetensors")
