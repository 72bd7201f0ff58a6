"""Interop checked by the real consumers: transformers, safetensors, torch.load and DCP's reader."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import stashpoint
from stashpoint.convert import export_hf, import_dcp, import_hf, import_torch_save
from stashpoint.errors import IndexCorruptError, PickleNotAllowedError, TruncatedDataError


class Opaque:
    """A value only a full unpickler can rebuild."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.n == self.n


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_transformers_loads_exported_llama_with_identical_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    optim = torch.optim.AdamW(model.parameters())
    stashpoint.save({"model": model, "optim": optim, "step": 1}, tmp_path / "ckpt")
    cfg_dir = tmp_path / "cfg"
    cfg.save_pretrained(cfg_dir)
    export_hf(
        tmp_path / "ckpt",
        tmp_path / "hf",
        max_shard_bytes=40_000,  # several shards and an index
        copy_files=(cfg_dir / "config.json",),
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)

    # and back: HF -> stashpoint -> HF is byte-identical per tensor
    import_hf(tmp_path / "hf", tmp_path / "back")
    export_hf(tmp_path / "back", tmp_path / "hf2", max_shard_bytes=40_000)
    first, second = _hf(tmp_path / "hf"), _hf(tmp_path / "hf2")
    assert first.keys() == second.keys()
    for k in first:
        assert first[k].dtype == second[k].dtype and torch.equal(_bits(first[k]), _bits(second[k])), k


def _hf(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def test_hf_directory_reads_in_place_and_loads_into_a_module(tmp_path):
    tensors = {
        "w": torch.randn(5, 3, dtype=torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int32),
        "mask": torch.rand(4) > 0.5,
    }
    os.makedirs(tmp_path / "hf")
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    got = stashpoint.load_full(tmp_path / "hf")
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    # the safetensors data files stashpoint writes are read by safetensors itself
    import_hf(tmp_path / "hf", tmp_path / "sp")
    data = [n for n in os.listdir(tmp_path / "sp") if n.endswith(".safetensors")]
    with safe_open(tmp_path / "sp" / data[0], "pt") as f:
        assert torch.equal(f.get_tensor("model.w"), tensors["w"])


def test_dcp_values_that_need_unpickling_are_refused_unless_allowed(tmp_path):
    state = {"w": torch.arange(6.0), "epoch": 3, "thing": Opaque(5)}
    dcp.save(state, checkpoint_id=tmp_path / "dcp")
    # tensors and plain values read without trust
    assert stashpoint.load_full(tmp_path / "dcp", ["w", "epoch"])["epoch"] == 3
    with pytest.raises(PickleNotAllowedError, match="thing"):
        stashpoint.load_full(tmp_path / "dcp")
    with pytest.raises(PickleNotAllowedError, match="thing"):
        import_dcp(tmp_path / "dcp", tmp_path / "sp")
    assert not (tmp_path / "sp").exists()
    import_dcp(tmp_path / "dcp", tmp_path / "sp", allow_pickle=True)
    assert stashpoint.load_full(tmp_path / "sp", allow_pickle=True)["thing"] == Opaque(5)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/stashpoint-should-not-exist",))


def test_hostile_dcp_metadata_is_rejected_without_running_it(tmp_path):
    dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "dcp")
    marker = "/tmp/stashpoint-should-not-exist"
    if os.path.exists(marker):
        os.unlink(marker)
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(_Boom(), f)
    with pytest.raises(IndexCorruptError, match="not allowed"):
        stashpoint.load_full(tmp_path / "dcp")
    assert not os.path.exists(marker)


def test_torch_save_files_import_weights_only_by_default(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    # an HF-style sharded pytorch_model.bin with its index
    sd = model.state_dict()
    names = list(sd)
    d = tmp_path / "bin"
    os.makedirs(d)
    torch.save({k: sd[k] for k in names[:2]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in names[2:]}, d / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= 2)}-of-00002.bin" for i, k in enumerate(names)}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    summary = import_torch_save(d, tmp_path / "sp", prefix="model.")
    assert summary.tensors == 4
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    stashpoint.load({"model": fresh}, tmp_path / "sp")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k])

    # a nested .pt with plain values; an object needing pickle only with allow_pickle
    torch.save({"model": sd, "epoch": 7, "cfg": {"lr": 0.1}}, tmp_path / "plain.pt")
    import_torch_save(tmp_path / "plain.pt", tmp_path / "plain")
    got = stashpoint.load_full(tmp_path / "plain")
    assert got["epoch"] == 7 and got["cfg.lr"] == 0.1 and torch.equal(got["model.0.weight"], sd["0.weight"])
    torch.save({"w": torch.ones(2), "obj": Opaque(1)}, tmp_path / "obj.pt")
    with pytest.raises(PickleNotAllowedError, match="allow_pickle"):
        import_torch_save(tmp_path / "obj.pt", tmp_path / "obj")
    import_torch_save(tmp_path / "obj.pt", tmp_path / "obj", allow_pickle=True)
    assert stashpoint.load_full(tmp_path / "obj", allow_pickle=True)["obj"] == Opaque(1)


def test_cli_converts_each_direction_with_a_summary(tmp_path):
    torch.save({"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3)}, tmp_path / "m.bin")
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}

    def convert(src, dst, to) -> str:
        cmd = [sys.executable, "-m", "stashpoint.cli.main", "convert", str(src), str(dst), "--to", to]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout

    out = convert(tmp_path / "m.bin", tmp_path / "sp", "stashpoint")
    assert "2 tensors" in out and "peak memory" in out
    convert(tmp_path / "sp", tmp_path / "dcp", "dcp")
    convert(tmp_path / "dcp", tmp_path / "sp2", "stashpoint")
    convert(tmp_path / "sp2", tmp_path / "hf", "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["a.bias", "a.weight"]
    convert(tmp_path / "m.bin", tmp_path / "hf-direct", "hf")
    assert torch.equal(
        load_file(tmp_path / "hf-direct" / "model.safetensors")["a.weight"], _hf(tmp_path / "hf")["a.weight"]
    )


_RSS_CHILD = r"""
import sys, torch
from stashpoint.convert import export_dcp, export_hf, import_dcp
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
src, out, what = sys.argv[1:4]
import stashpoint; stashpoint.read_index(src); torch.ones(1) + 1
base = hwm()
if what == "hf":
    export_hf(src, out)
elif what == "dcp":
    export_dcp(src, out)
else:
    import_dcp(src, out)
print(hwm() - base)
"""


def test_conversions_keep_memory_bounded(tmp_path):
    # 96 tensors of 4 MiB: a 384 MiB model; each conversion may hold a few tensors, not the model
    state = {f"model.layer{i}.weight": torch.full((1024, 1024), float(i)) for i in range(96)}
    stashpoint.save(state, tmp_path / "big")
    del state
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    bound = 64 << 20
    for what, src, out in (
        ("hf", tmp_path / "big", tmp_path / "hf"),
        ("dcp", tmp_path / "big", tmp_path / "dcp"),
        ("import", tmp_path / "dcp", tmp_path / "back"),
    ):
        cmd = [sys.executable, "-c", _RSS_CHILD, str(src), str(out), what]
        grew = int(
            subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()[-1]
        )
        assert grew < bound, (what, grew)
    assert torch.equal(
        stashpoint.load_full(tmp_path / "back", ["model.layer95.weight"])["model.layer95.weight"],
        torch.full((1024, 1024), 95.0),
    )


def test_verify_and_inspect_read_dcp_checkpoints(tmp_path):
    from stashpoint.engine.verify import verify_checkpoint

    dcp.save({"w": torch.arange(10.0), "n": 4}, checkpoint_id=tmp_path / "dcp")
    report = verify_checkpoint(str(tmp_path / "dcp"))
    assert report.ok and not report.checksums and report.chunks == 1
    index = stashpoint.read_index(tmp_path / "dcp")
    assert index.metadata.user["source_format"] == "torch.distributed.checkpoint"
    data = tmp_path / "dcp" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])  # truncated: the records point past its end
    with pytest.raises((IndexCorruptError, TruncatedDataError), match="'[wn]'"):
        stashpoint.load_full(tmp_path / "dcp")


def test_dcp_checkpoints_are_merge_inputs(tmp_path):
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    dcp.save({"model": {"w": a}}, checkpoint_id=tmp_path / "a")
    dcp.save({"model": {"w": b}}, checkpoint_id=tmp_path / "b")
    stashpoint.merge(out=tmp_path / "avg", models=[tmp_path / "a", tmp_path / "b"], method="uniform")
    got = stashpoint.load_full(tmp_path / "avg")["model.w"]
    assert torch.allclose(got, (a + b) / 2, atol=1e-7)
