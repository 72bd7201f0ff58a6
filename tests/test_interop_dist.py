"""DCP and HF interop across world sizes, checked by torch's own DCP reader and writer.

Each check here runs FSDP2 models on real gloo rank pools at world sizes 2 and 3.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import stashpoint
from stashpoint.convert import export_dcp, export_hf, import_dcp, strip_prefix

import interop_cases


def flat_tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, torch.Tensor):
            out[name] = v
        else:
            out.update(flat_tensors(v, name))
    return out


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k


def torch_reads(dcp_dir, tmp_path, name: str) -> dict[str, torch.Tensor]:
    """What torch's own DCP reader finds in a DCP checkpoint, flattened."""
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(dcp_dir, out)
    return flat_tensors(torch.load(out, weights_only=True))


def test_dcp_written_at_2_loads_into_stashpoint_at_3_and_round_trips(pools, tmp_path):
    dcp_dir = str(tmp_path / "dcp-ws2")
    pools(2).run(interop_cases.dcp_save, dcp_dir)
    reference = torch_reads(dcp_dir, tmp_path, "reference")
    assert any(k.endswith("exp_avg_sq") for k in reference)

    # read in place, whole tensors
    same_bits(
        {k: v for k, v in stashpoint.load_full(dcp_dir).items() if isinstance(v, torch.Tensor)}, reference
    )
    # read in place into FSDP2 at world size 3 (resharded, byte ranges of the .distcp files)
    got = pools(3).run(interop_cases.stashpoint_load, dcp_dir)
    same_bits(flat_tensors(got[0]["state"]), reference)
    assert all(r["bytes_read"] < sum(t.numel() * t.element_size() for t in reference.values()) for r in got)

    # DCP -> stashpoint -> DCP is byte-identical per tensor, as torch reads it
    sp = tmp_path / "sp"
    summary = import_dcp(dcp_dir, sp)
    assert summary.tensors == len(reference) and summary.values > 0
    export_dcp(sp, tmp_path / "dcp-again")
    same_bits(torch_reads(str(tmp_path / "dcp-again"), tmp_path, "again"), reference)


def test_our_dcp_export_loads_with_dcp_at_same_and_other_world_size(pools, tmp_path):
    sp_dir = str(tmp_path / "sp-ws2")
    pools(2).run(interop_cases.stashpoint_save, sp_dir)
    saved = {k: v for k, v in stashpoint.load_full(sp_dir).items() if isinstance(v, torch.Tensor)}
    export_dcp(sp_dir, tmp_path / "dcp")
    for world in (2, 3):
        got = pools(world).run(interop_cases.dcp_load, str(tmp_path / "dcp"))
        same_bits(flat_tensors(got[0]), saved)

    # HF export of the model part, loaded straight into FSDP2 at world size 3
    export_hf(sp_dir, tmp_path / "hf", name_map=strip_prefix("model."))
    got = pools(3).run(interop_cases.hf_load, str(tmp_path / "hf"))
    model_part = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    same_bits(got[0]["state"], model_part)
    total = sum(t.numel() * t.element_size() for t in model_part.values())
    for r in got:  # each rank reads its shards, not the whole file
        assert 0 < r["bytes_read"] < total
