"""Merging checkpoints saved sharded at world sizes 2 and 3 gives the merge of their consolidated forms."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

import merge_cases
import stashpoint
from stashpoint.format.index import TensorRecord


def test_sharded_at_different_world_sizes_equals_consolidated(pools, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-dist")
    sharded = {seed: str(root / f"sharded{seed}") for seed in range(4)}
    pools(2).run(merge_cases.save_models, [(sharded[0], 0), (sharded[1], 1)])
    pools(3).run(merge_cases.save_models, [(sharded[2], 2), (sharded[3], 3)])
    # the inputs really are sharded: several chunks per tensor
    for seed, ws in ((0, 2), (3, 3)):
        index = stashpoint.read_index(sharded[seed])
        assert index.metadata.world_size == ws
        rec = index.items["model.emb"]
        assert isinstance(rec, TensorRecord) and len(rec.chunks) == ws
    whole, hf = {}, {}
    for seed in range(4):
        state = merge_cases.full_state(seed)
        whole[seed] = str(root / f"whole{seed}")
        stashpoint.save(state, whole[seed], step=seed)
        hf[seed] = root / f"hf{seed}"
        hf[seed].mkdir()
        save_file(state["model"], hf[seed] / "model.safetensors")
    cases = [
        ("uniform", {}, False),
        ("ema", {"decay": 0.7}, False),
        ("lawa", {"k": 2}, False),
        ("task_arithmetic", {"lambda": 0.8}, True),
        ("ties", {"density": 0.4}, True),
        ("dare_ties", {"density": 0.6, "seed": 5}, True),
        ("model_stock", {}, True),
        ("slerp", {"t": 0.3}, True),
        ("curvature", {"threshold": 1e-9}, True),
    ]
    for method, params, with_base in cases:
        outs = {}
        for form, paths in (("sharded", sharded), ("whole", whole), ("hf", hf)):
            if form == "hf" and method == "curvature":
                continue  # HF directories carry no optimizer state
            ids = [1] if method == "slerp" else [1, 2, 3]
            models = [str(paths[i]) for i in ids] if with_base else [str(paths[i]) for i in range(4)]
            base = str(paths[0]) if with_base else None
            out = root / f"{method}-{form}"
            stashpoint.merge(out=out, models=models, base_model=base, method=method, parameters=params)
            outs[form] = stashpoint.load_full(out)
        ref = outs["whole"]
        assert set(ref) == {"model.emb", "model.proj", "model.norm", "model.pos"}, method
        for form, got in outs.items():
            assert got.keys() == ref.keys(), (method, form)
            for name in ref:
                assert got[name].dtype == ref[name].dtype, (method, form, name)
                assert torch.equal(got[name], ref[name]), (method, form, name)
        assert ref["model.norm"].dtype == torch.bfloat16
