"""Expert parallelism: grouped expert weights sharded on the expert dimension (DTensor
``Shard(0)`` over an EP mesh) and per-expert modules, saved at EP=4 and loaded at EP=2
(x DP=2) and EP=1 with Adam's moments, bit for bit; exported to HF's per-expert layout and
imported back, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import layout_cases
import stashpoint
from layout_cases import EXPERTS, moe_flat, moe_state
from stashpoint.convert import ExpertSplit, export_hf, import_hf
from stashpoint.errors import InconsistentStateError, InvalidOptionError

RULES = (
    ExpertSplit(grouped="w1", per_expert="experts.{i}.w1.weight", transpose=True),
    ExpertSplit(grouped="w2", per_expert="experts.{i}.w2.weight", transpose=True),
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def ep4(pools, tmp_path_factory):
    path = tmp_path_factory.mktemp("ep") / "ep4"
    held = pools(4).run(layout_cases.moe_save_case, str(path))
    assert held == [[str(2 * r), str(2 * r + 1)] for r in range(4)]
    return path


def test_ep4_checkpoint_loads_at_ep2_bit_exact(pools, ep4):
    assert pools(4).run(layout_cases.moe_load_case, str(ep4)) == [[]] * 4


def test_ep4_checkpoint_loads_at_ep1_bit_exact(ep4):
    index = stashpoint.read_index(ep4)
    assert index.items["model.w1"].shape == (EXPERTS, layout_cases.D, layout_cases.H)
    assert len(index.items["model.w1"].chunks) == 4  # one per EP rank
    target = moe_state(list(range(EXPERTS)), seed=1, steps=1)
    stashpoint.load(target, ep4, per_rank="rank0")
    want, got = moe_flat(moe_state(list(range(EXPERTS)))), moe_flat(target)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(_bits(got[k]), _bits(want[k]))] == []
    assert {k for k in want if k.startswith("optim.") and k.endswith("exp_avg_sq")} >= {
        "optim.state.w1.exp_avg_sq",
        "optim.state.experts.7.weight.exp_avg_sq",
    }


def test_grouped_experts_export_to_hf_per_expert_and_import_back(ep4, tmp_path):
    export_hf(ep4, tmp_path / "hf", experts=RULES)
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    full = stashpoint.load_full(ep4)
    assert "w1" not in hf and "w2" not in hf
    for i in range(EXPERTS):
        assert torch.equal(hf[f"experts.{i}.w1.weight"], full["model.w1"][i].t())
        assert torch.equal(hf[f"experts.{i}.w2.weight"], full["model.w2"][i].t())
        assert torch.equal(hf[f"experts.{i}.weight"], full[f"model.experts.{i}.weight"])
    import_hf(tmp_path / "hf", tmp_path / "back", experts=RULES)
    back = stashpoint.load_full(tmp_path / "back")
    model = {k: v for k, v in full.items() if k.startswith("model.")}
    assert back.keys() == model.keys()
    assert all(torch.equal(_bits(back[k]), _bits(v)) and back[k].shape == v.shape for k, v in model.items())
    # a sharded export splits the experts across files and still comes back whole
    export_hf(ep4, tmp_path / "hf-sharded", experts=RULES, max_shard_bytes=600)
    import_hf(tmp_path / "hf-sharded", tmp_path / "back-sharded", experts=RULES)
    again = stashpoint.load_full(tmp_path / "back-sharded")
    assert all(torch.equal(_bits(again[k]), _bits(v)) for k, v in model.items())


def test_expert_rules_are_checked(ep4, tmp_path):
    with pytest.raises(InvalidOptionError):
        ExpertSplit(grouped="w1", per_expert="experts.w1.weight")
    export_hf(ep4, tmp_path / "hf", experts=RULES)
    # expert 3 of w1 missing: the join names it instead of stacking seven experts
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    del hf["experts.3.w1.weight"]
    from safetensors.torch import save_file

    (tmp_path / "gap").mkdir()
    save_file(hf, tmp_path / "gap" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InconsistentStateError, match="experts.3.w1.weight"):
        import_hf(tmp_path / "gap", tmp_path / "out", experts=RULES)
    assert not (tmp_path / "out").exists()
