"""Canonical names through real saves and loads in one process: compiled, activation-
checkpointed and DDP-named checkpoints into plain modules and back, a stage's renumbered
layers, partial loads and the key diff.  (Several ranks: test_names_dist.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.pipelining import SplitPoint, pipeline

import stashpoint as sp
from stashpoint.convert import import_torch_save
from stashpoint.engine.tensors import content_digests, word_sums
from stashpoint.errors import MissingKeyError, UnexpectedKeyError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(torch.relu(self.attn(x)))


class Net(nn.Module):
    def __init__(self, layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Linear(4, 4)
            self.layers = nn.ModuleList(Block() for _ in range(layers))
            self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def trained(seed: int, wrap=lambda m: m) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """A wrapped model, its Adam after one step, and the plain module inside."""
    plain = Net(seed=seed)
    model = wrap(plain)
    optim = torch.optim.Adam(model.parameters(), lr=0.1 * (seed + 1))
    model(torch.ones(2, 4)).sum().backward()
    optim.step()
    return model, optim, plain


def bits(module: nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()
    }


def adam_bits(optim: torch.optim.Optimizer) -> list[bytes]:
    return [
        s[k].contiguous().view(torch.uint8).numpy().tobytes()
        for s in optim.state.values()
        for k in ("exp_avg", "exp_avg_sq")
    ]


def _ac(m: Net) -> Net:
    for i, layer in enumerate(m.layers):
        m.layers[i] = checkpoint_wrapper(layer)
    return m


WRAPPERS = {
    "compiled": torch.compile,
    "activation_checkpointed": _ac,
    "compiled_and_checkpointed": lambda m: torch.compile(_ac(m)),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("direction", ["wrapped_to_plain", "plain_to_wrapped"])
def test_wrapped_and_plain_modules_round_trip(tmp_path: Path, wrapper: str, direction: str) -> None:
    wrap = WRAPPERS[wrapper]
    src_wrap, dst_wrap = (wrap, lambda m: m) if direction == "wrapped_to_plain" else (lambda m: m, wrap)
    model, optim, plain = trained(0, src_wrap)
    sp.save({"model": model, "optim": optim}, tmp_path / "ck")
    assert all(
        "_orig_mod" not in n and "_checkpoint_wrapped" not in n for n in sp.read_index(tmp_path / "ck").items
    )
    model2, optim2, plain2 = trained(1, dst_wrap)
    assert bits(plain2) != bits(plain)
    sp.load({"model": model2, "optim": optim2}, tmp_path / "ck")
    assert bits(plain2) == bits(plain)
    assert adam_bits(optim2) == adam_bits(optim)


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrapped_state_dict_saved_as_a_dict_loads_into_the_plain_module(tmp_path: Path, wrapper: str) -> None:
    model, _, plain = trained(0, WRAPPERS[wrapper])
    sp.save({"model": model.state_dict()}, tmp_path / "ck")  # names with wrapper segments
    target = Net(seed=5)
    result = sp.load({"model": target}, tmp_path / "ck")
    assert bits(target) == bits(plain)
    assert result.renamed == ()  # the save already wrote canonical names


@pytest.mark.parametrize("wrapper", ["compiled", "compiled_and_checkpointed", "ddp"])
def test_foreign_checkpoint_with_wrapper_names_loads_into_the_plain_module(
    tmp_path: Path, wrapper: str
) -> None:
    """A torch.save of a wrapped module's state_dict keeps every wrapper segment."""
    _, _, plain = trained(0)
    if wrapper == "ddp":  # DistributedDataParallel.state_dict(): every name under "module."
        sd = {f"module.{k}": v for k, v in plain.state_dict().items()}
    else:
        sd = WRAPPERS[wrapper](plain).state_dict()
    assert all(k.startswith(("_orig_mod.", "module.")) for k in sd)
    torch.save(sd, tmp_path / "w.pt")
    import_torch_save(tmp_path / "w.pt", tmp_path / "ck", prefix="model.")
    target = Net(seed=5)
    diff = sp.diff_keys({"model": target}, tmp_path / "ck")
    assert diff.complete and len(diff.renamed) == len(sd)
    result = sp.load({"model": target}, tmp_path / "ck")
    assert bits(target) == bits(plain)
    assert sorted(b for _, b in result.renamed) == sorted(f"model.{k}" for k in plain.state_dict())


class HasModuleChild(nn.Module):
    """A user module whose child is really called ``module``, next to another."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.other = nn.Linear(2, 2)


def test_a_child_called_module_is_not_a_ddp_prefix(tmp_path: Path) -> None:
    src = HasModuleChild()
    sp.save({"model": src}, tmp_path / "ck")
    assert "model.module.weight" in sp.read_index(tmp_path / "ck").items
    dst = HasModuleChild()
    result = sp.load({"model": dst}, tmp_path / "ck")
    assert bits(dst) == bits(src) and result.renamed == ()


def test_missing_keys_are_an_error_unless_the_load_is_partial(tmp_path: Path) -> None:
    model, _, plain = trained(0)
    sd = {k: v for k, v in plain.state_dict().items() if not k.startswith("head.")}
    sp.save({"model": sd}, tmp_path / "ck")
    target = Net(seed=5)
    before = bits(target)
    with pytest.raises(MissingKeyError) as info:
        sp.load({"model": target}, tmp_path / "ck")
    msg = str(info.value)
    assert str(tmp_path / "ck") in msg and "'model.head.bias'" in msg and "partial=True" in msg
    assert bits(target) == before  # a failed load changes nothing
    result = sp.load({"model": target}, tmp_path / "ck", partial=True)
    assert result.unwritten == ("model.head.bias", "model.head.weight")
    after = bits(target)
    assert after["head.weight"] == before["head.weight"]
    assert all(after[k] == bits(plain)[k] for k in sd)


def test_partial_load_still_refuses_unexpected_keys(tmp_path: Path) -> None:
    _, _, plain = trained(0)
    sp.save({"model": {**plain.state_dict(), "extra.w": torch.ones(2)}}, tmp_path / "ck")
    with pytest.raises(UnexpectedKeyError, match="'model.extra.w'.*strict=False"):
        sp.load({"model": Net(seed=5)}, tmp_path / "ck", partial=True)
    target = Net(seed=5)
    sp.load({"model": target}, tmp_path / "ck", strict=False)
    assert bits(target) == bits(plain)


def test_diff_keys_summary(tmp_path: Path) -> None:
    _, _, plain = trained(0)
    sd = {f"_orig_mod.{k}": v for k, v in plain.state_dict().items() if k != "head.bias"}
    torch.save({**sd, "gone.w": torch.ones(1)}, tmp_path / "w.pt")
    import_torch_save(tmp_path / "w.pt", tmp_path / "ck", prefix="model.")
    diff = sp.diff_keys({"model": Net(seed=5)}, tmp_path / "ck")
    assert diff.missing == ("model.head.bias",)
    assert diff.unexpected == ("model.gone.w",)
    assert ("model._orig_mod.embed.weight", "model.embed.weight") in diff.renamed
    text = diff.summary(limit=2)
    assert text.splitlines()[0] == "1 missing: model.head.bias"
    assert "1 unexpected: model.gone.w" in text and f"{len(sd)} renamed: " in text and "more)" in text


def test_a_stage_saves_its_layers_under_global_numbers(tmp_path: Path) -> None:
    stage = Net(layers=2, seed=9)
    layout = sp.StageLayout(layers_key="layers", first_layer=2, num_layers=2)
    optim = torch.optim.Adam(stage.parameters())
    stage(torch.ones(1, 4)).sum().backward()
    optim.step()
    sp.save({"model": sp.WithLayout(stage, layout), "optim": optim}, tmp_path / "ck")
    index = sp.read_index(tmp_path / "ck")
    assert "model.layers.3.mlp.weight" in index.items and "model.layers.0.mlp.weight" not in index.items
    assert "optim.state.layers.2.attn.weight.exp_avg" in index.items
    (rec,) = index.metadata.layouts
    assert (rec.rank, rec.prefix, rec.kind, rec.key, rec.global_ids) == (
        0,
        "model",
        "stage",
        "layers",
        (2, 3),
    )
    # the same stage loads back through its layout, optimizer included
    stage2 = Net(layers=2, seed=7)
    optim2 = torch.optim.Adam(stage2.parameters())
    stage2(torch.ones(1, 4)).sum().backward()
    optim2.step()
    sp.load({"model": sp.WithLayout(stage2, layout), "optim": optim2}, tmp_path / "ck")
    assert bits(stage2) == bits(stage) and adam_bits(optim2) == adam_bits(optim)
    # and into the unsplit model, where only the stage's layers are written
    whole = Net(layers=4, seed=5)
    result = sp.load({"model": whole}, tmp_path / "ck", partial=True)
    assert bits(whole.layers[3]) == bits(stage.layers[1]) and bits(whole.layers[2]) == bits(stage.layers[0])
    assert "model.layers.0.attn.weight" in result.unwritten


def test_expert_layout_renumbers_experts_inside_every_layer(tmp_path: Path) -> None:
    class MoE(nn.Module):
        def __init__(self, experts: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                nn.ModuleDict({"experts": nn.ModuleList(nn.Linear(2, 2) for _ in range(experts))})
                for _ in range(2)
            )

    shard = MoE(experts=2)
    layout = sp.ExpertLayout.strided("layers.*.experts", ep_rank=1, ep_size=2, total_experts=4)
    sp.save({"model": sp.WithLayout(shard, layout)}, tmp_path / "ck")
    names = set(sp.read_index(tmp_path / "ck").items)
    assert {"model.layers.0.experts.1.weight", "model.layers.1.experts.3.bias"} <= names
    whole = MoE(experts=4)
    sp.load({"model": whole}, tmp_path / "ck", partial=True)
    assert bits(whole.layers[1].experts[3]) == bits(shard.layers[1].experts[1])


def test_a_local_number_beyond_the_layout_is_refused(tmp_path: Path) -> None:
    layout = sp.StageLayout(layers_key="layers", first_layer=0, num_layers=2)
    with pytest.raises(sp.errors.InvalidStateError, match="entry 2 of 'layers'") as info:
        sp.save({"model": sp.WithLayout(Net(layers=3), layout)}, tmp_path / "ck")
    assert str(tmp_path / "ck") in str(info.value)
    assert not (tmp_path / "ck").exists()


def test_content_digests_tell_different_bytes_apart() -> None:
    """The digests the collision check compares; word_sums (the GPU one) runs on CPU too."""
    torch.manual_seed(0)
    a = torch.randn(1001, dtype=torch.bfloat16)
    b = a.clone()
    b.view(torch.int16)[500] ^= 1  # one bit
    c = a.clone()
    c[[2, 3]] = a[[3, 2]]  # two elements swapped
    da, da2, db, dc = content_digests([a, a.clone(), b, c])
    assert da == da2 and da[0] == "crc32c" and db != da and dc != da
    assert torch.equal(word_sums(a), word_sums(a.clone()))
    for other in (b, c):
        assert not torch.equal(word_sums(other), word_sums(a))
    odd = torch.arange(20, dtype=torch.uint8)[1:]  # starts at byte 1 (not 4-byte aligned), 19 bytes
    sums = word_sums(odd)
    assert sums.tolist() == word_sums(odd.clone()).tolist()
    assert int(sums[-1]) == 17 + 18 + 19  # the 3 bytes after the 4 words
    assert word_sums(torch.empty(0)).tolist() == [0] * 6


def test_traced_pipeline_stages_keep_global_names_without_a_layout(tmp_path: Path) -> None:
    """torch.distributed.pipelining's tracer keeps the original names: no layout needed."""
    full = Net(layers=4, seed=0)
    pipe = pipeline(full, mb_args=(torch.ones(2, 4),), split_spec={"layers.2": SplitPoint.BEGINNING})
    second = pipe.get_stage_module(1)
    sp.save({"model": second}, tmp_path / "ck")
    names = set(sp.read_index(tmp_path / "ck").items)
    assert {"model.layers.2.attn.weight", "model.layers.3.mlp.bias", "model.head.weight"} <= names
    assert not any(n.startswith("model.layers.0.") for n in names)
    whole = Net(layers=4, seed=5)
    sp.load({"model": whole}, tmp_path / "ck", partial=True)
    assert bits(whole.layers[3]) == bits(full.layers[3]) and bits(whole.head) == bits(full.head)


def test_async_save_records_layouts_and_global_names(tmp_path: Path) -> None:
    stage = Net(layers=2, seed=3)
    optim = torch.optim.Adam(stage.parameters())
    stage(torch.ones(1, 4)).sum().backward()
    optim.step()
    layout = sp.StageLayout(layers_key="layers", first_layer=4, num_layers=2)
    handle = sp.async_save(
        {"model": sp.WithLayout(stage, layout), "optim": optim}, tmp_path / "ck", mode="lazy"
    )
    handle.wait()
    index = sp.read_index(tmp_path / "ck")
    assert {"model.layers.5.attn.weight", "optim.state.layers.4.mlp.bias.exp_avg"} <= set(index.items)
    assert [(n.key, n.global_ids) for n in index.metadata.layouts] == [("layers", (4, 5))]
    back = Net(layers=2, seed=8)
    sp.load({"model": sp.WithLayout(back, layout)}, tmp_path / "ck")
    assert bits(back) == bits(stage)
