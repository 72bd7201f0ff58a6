"""Canonical names, pure: wrapper segments, DDP's prefix, layer and expert renumbering,
matching a checkpoint's names, the save-time collision check, and ``metadata.names``.
No processes, no torch state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stashpoint.errors import (
    IndexCorruptError,
    InvalidOptionError,
    InvalidStateError,
    NameCollisionError,
)
from stashpoint.format.index import ChunkRecord, Index, NameLayout, SaveMetadata, TensorRecord
from stashpoint.format.index_json import seal
from stashpoint.planning.layout import Box
from stashpoint.planning.name_match import checkpoint_names, ddp_roots, diff_keys
from stashpoint.planning.names import (
    ExpertLayout,
    StageLayout,
    check_layouts,
    stage_layouts,
    strip_wrappers,
    to_global,
    to_local,
)
from stashpoint.planning.save_plan import CHECKED, REPLICATED, LocalItem, build_save_plan

# --- wrapper segments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, want",
    [
        ("model._orig_mod.layers.0.w", "model.layers.0.w"),
        ("model.layers.0._checkpoint_wrapped_module.w", "model.layers.0.w"),
        ("model._fsdp_wrapped_module.w", "model.w"),
        ("model._orig_mod.module._checkpoint_wrapped_module.w", "model.module.w"),  # DDP: by ddp_roots
        ("model.orig_mod.w", "model.orig_mod.w"),  # only the exact segment
        ("model.my_orig_mod_.w", "model.my_orig_mod_.w"),
        ("model.module.w", "model.module.w"),
    ],
)
def test_wrapper_segments_are_dropped(name: str, want: str) -> None:
    assert strip_wrappers(name) == want


segment = st.sampled_from(
    ["layers", "0", "1", "w", "module", "attn", "_orig_mod", "_checkpoint_wrapped_module"]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(segment, min_size=1, max_size=8))
def test_strip_wrappers_is_idempotent_and_keeps_the_rest(parts: list[str]) -> None:
    name = ".".join(parts)
    once = strip_wrappers(name)
    assert strip_wrappers(once) == once
    assert once.split(".") == [p for p in parts if p not in ("_orig_mod", "_checkpoint_wrapped_module")] or (
        once == "" and all(p in ("_orig_mod", "_checkpoint_wrapped_module") for p in parts)
    )


# --- DDP's prefix ------------------------------------------------------------------------------


def test_ddp_prefix_is_stripped_only_from_a_whole_wrapper_state_dict() -> None:
    names = ["model.module.0.weight", "model.module.0.bias", "step"]
    targets = ["model.0.weight", "model.0.bias"]
    assert ddp_roots(names, targets, ["model"]) == ("model",)
    assert checkpoint_names(names, targets, ["model"]) == {
        "model.module.0.weight": "model.0.weight",
        "model.module.0.bias": "model.0.bias",
    }


def test_a_module_called_module_next_to_others_is_kept() -> None:
    names = ["model.module.w", "model.head.w"]
    assert ddp_roots(names, ["model.w", "model.head.w"], ["model"]) == ()
    assert checkpoint_names(names, ["model.w", "model.head.w"], ["model"]) == {}


def test_a_target_that_has_module_itself_is_never_renamed_into() -> None:
    names = ["model.module.w"]
    targets = ["model.module.w"]  # the target's only child is called "module": names already match
    assert checkpoint_names(names, targets, ["model"]) == {}


def test_ddp_prefix_of_optimizer_state() -> None:
    names = ["optim.state.module.0.weight.exp_avg", "optim.param_groups"]
    targets = ["optim.state.0.weight.exp_avg", "optim.param_groups"]
    assert ddp_roots(names, targets, ["optim"]) == ("optim.state",)
    assert checkpoint_names(names, targets, ["optim"]) == {
        "optim.state.module.0.weight.exp_avg": "optim.state.0.weight.exp_avg"
    }


def test_ambiguous_names_stay_as_they_are() -> None:
    # both would become model.w: neither is renamed, and a strict load reports them
    names = ["model._orig_mod.w", "model._checkpoint_wrapped_module.w"]
    assert checkpoint_names(names, ["model.w"], ["model"]) == {}
    # a name the checkpoint already has wins
    assert checkpoint_names(["model.w", "model._orig_mod.w"], ["model.w"], ["model"]) == {}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(segment, min_size=1, max_size=5).map(".".join), min_size=1, max_size=12, unique=True),
    st.sampled_from(["", "_orig_mod.", "module.", "_orig_mod.module._checkpoint_wrapped_module."]),
)
def test_wrapped_checkpoint_names_map_back_to_the_plain_ones(plain: list[str], wrap: str) -> None:
    """A plain model's names, saved under a wrapper, match the plain target again."""
    plain = sorted({strip_wrappers(n) for n in plain if strip_wrappers(n)})
    if not plain:
        return
    targets = [f"model.{n}" for n in plain]
    names = [f"model.{wrap}{n}" for n in plain]
    renames = checkpoint_names(names, targets, ["model"])
    got = sorted(renames.get(n, n) for n in names)
    if "module." in wrap and any(n.startswith("module.") for n in plain):
        return  # the target itself has a top-level "module": DDP's prefix is kept, by the rule
    assert got == sorted(targets)
    assert len(set(renames.values())) == len(renames)  # never two names into one


# --- renumbering ---------------------------------------------------------------------------------


def test_stage_layout_renumbers_its_layers_only() -> None:
    lay = StageLayout(layers_key="layers", first_layer=8, num_layers=4)
    assert to_global("layers.0.attn.w", [lay]) == "layers.8.attn.w"
    assert to_global("layers.3", [lay]) == "layers.11"
    assert to_global("embed.w", [lay]) == "embed.w"
    assert to_global("layers_norm.0.w", [lay]) == "layers_norm.0.w"
    assert to_local("layers.9.attn.w", [lay]) == "layers.1.attn.w"
    assert to_local("layers.2.attn.w", [lay]) is None  # another stage's
    with pytest.raises(InvalidStateError, match="entry 4 of 'layers'"):
        to_global("layers.4.w", [lay])


def test_nested_key_and_wildcard_expert_layout() -> None:
    stage = StageLayout(layers_key="model.layers", first_layer=2, num_layers=2)
    experts = ExpertLayout.strided("model.layers.*.moe.experts", ep_rank=1, ep_size=2, total_experts=8)
    assert experts.global_ids == (1, 3, 5, 7)
    layouts = [stage, experts]
    assert to_global("model.layers.1.moe.experts.2.w1", layouts) == "model.layers.3.moe.experts.5.w1"
    assert to_global("model.layers.0.moe.router.w", layouts) == "model.layers.2.moe.router.w"
    assert to_local("model.layers.3.moe.experts.5.w1", layouts) == "model.layers.1.moe.experts.2.w1"
    assert to_local("model.layers.3.moe.experts.4.w1", layouts) is None
    assert ExpertLayout.contiguous("experts", 4, 2).global_ids == (4, 5)


def test_stage_layouts_from_layer_counts() -> None:
    assert [(s.first_layer, s.num_layers) for s in stage_layouts("layers", [3, 1, 4])] == [
        (0, 3),
        (3, 1),
        (4, 4),
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda: StageLayout(layers_key="", first_layer=0, num_layers=1),
        lambda: StageLayout(layers_key="a..b", first_layer=0, num_layers=1),
        lambda: StageLayout(layers_key="layers", first_layer=-1, num_layers=1),
        lambda: StageLayout(layers_key="layers", first_layer=0, num_layers=1.5),
        lambda: ExpertLayout(experts_key="experts", global_ids=(0, 0)),
        lambda: ExpertLayout(experts_key="experts", global_ids=[0, 1]),
        lambda: check_layouts([StageLayout("layers", 0, 1), StageLayout("layers", 1, 1)]),
        lambda: check_layouts(["layers"]),
    ],
)
def test_bad_layouts_are_named_errors(make) -> None:
    with pytest.raises(InvalidOptionError):
        make()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5), st.integers(0, 4), st.integers(0, 6))
def test_stages_never_share_a_global_name_and_invert(counts: list[int], stage: int, experts: int) -> None:
    layouts = stage_layouts("layers", counts)
    stage = min(stage, len(counts) - 1)
    seen: dict[str, int] = {}
    for s, lay in enumerate(layouts):
        for i in range(lay.num_layers):
            name = to_global(f"layers.{i}.w", [lay])
            assert name not in seen, (name, s, seen[name])
            seen[name] = s
            assert to_local(name, [lay]) == f"layers.{i}.w"
    assert len(seen) == sum(counts)
    ex = ExpertLayout.contiguous("layers.*.experts", experts, 3)
    both = [layouts[stage], ex]
    local = "layers.0.experts.2.w"
    assert to_local(to_global(local, both), both) == local


# --- the difference ---------------------------------------------------------------------------


def test_diff_keys_reports_missing_unexpected_renamed() -> None:
    names = ["model._orig_mod.a", "model.b", "model.old", "other.x"]
    targets = ["model.a", "model.b", "model.new"]
    renames = checkpoint_names(names, targets, ["model"])
    diff = diff_keys(names, targets, ["model"], renames)
    assert diff.missing == ("model.new",)
    assert diff.unexpected == ("model.old",)  # other.x is under no target name
    assert diff.renamed == (("model._orig_mod.a", "model.a"),)
    assert not diff.complete
    text = diff.summary()
    assert "1 missing: model.new" in text and "1 unexpected: model.old" in text
    assert "model._orig_mod.a -> model.a" in text
    assert diff_keys(["model.a"], ["model.a"], ["model"], {}).summary() == "names match"


# --- the collision check ------------------------------------------------------------------------


def _replica(fqn: str, digest: tuple[str, int], scope: str = REPLICATED) -> LocalItem:
    shape = (4, 4)
    return LocalItem(
        fqn=fqn,
        is_tensor=True,
        scope=scope,
        dtype="float32",
        shape=shape,
        itemsize=4,
        boxes=(Box((0, 0), shape, (0, 0)),),
        digest=digest,
    )


def test_replicas_with_the_same_bytes_are_written_once() -> None:
    plan = build_save_plan([[_replica("m.w", ("crc32c", 7))], [_replica("m.w", ("crc32c", 7))]])
    assert sum(len(w) for w in plan.writes) == 1


def test_replicas_with_different_bytes_are_a_collision() -> None:
    with pytest.raises(NameCollisionError) as info:
        build_save_plan(
            [[_replica("m.w", ("sums", 1))], [_replica("m.w", ("sums", 1))], [_replica("m.w", ("sums", 2))]]
        )
    msg = str(info.value)
    assert "ranks 0 and 2" in msg and "'m.w'" in msg and "WithLayout" in msg


def test_digests_of_different_algorithms_are_not_compared() -> None:
    plan = build_save_plan([[_replica("m.w", ("crc32c", 1))], [_replica("m.w", ("sums", 2))]])
    assert sum(len(w) for w in plan.writes) == 1


def test_checked_values_that_differ_stay_per_rank() -> None:
    plan = build_save_plan([[_replica("t", ("crc32c", 1), CHECKED)], [_replica("t", ("crc32c", 2), CHECKED)]])
    assert plan.items["t"].scope == "per_rank"


# --- metadata.names in the index ------------------------------------------------------------------


def _index(layouts: tuple[NameLayout, ...]) -> Index:
    chunk = ChunkRecord(
        offsets=(0,), shape=(1,), file="data-00000.safetensors", key="m.w", byte_range=(8, 12), crc32c=(0,)
    )
    meta = SaveMetadata(
        world_size=2, created_unix=1.0, torch_version="t", stashpoint_version="s", layouts=layouts
    )
    return Index(metadata=meta, items={"m.w": TensorRecord(dtype="float32", shape=(1,), chunks=(chunk,))})


def test_names_round_trip_through_the_index() -> None:
    layouts = (
        NameLayout(rank=0, prefix="model", kind="stage", key="layers", global_ids=(0, 1)),
        NameLayout(rank=1, prefix="model", kind="experts", key="layers.*.experts", global_ids=(1, 3)),
    )
    text = _index(layouts).to_json()
    assert json.loads(text)["metadata"]["names"]["version"] == 1
    assert Index.from_json(text, "ck").metadata.layouts == layouts
    plain = _index(()).to_json()
    assert "names" not in json.loads(plain)["metadata"]  # optional: absent when nothing was renumbered
    assert Index.from_json(plain, "ck").metadata.layouts == ()


def _edited(edit) -> str:
    doc = json.loads(
        _index((NameLayout(rank=0, prefix="m", kind="stage", key="layers", global_ids=(2,)),)).to_json()
    )
    del doc["index_sha256"]
    edit(doc["metadata"]["names"])
    return seal(json.dumps(doc, indent=1))


def test_a_later_names_version_is_left_unread() -> None:
    text = _edited(lambda names: names.update(version=2, layouts="whatever it becomes"))
    assert Index.from_json(text, "ck").metadata.layouts == ()


@pytest.mark.parametrize(
    "edit",
    [
        lambda n: n.update(version="1"),
        lambda n: n.pop("layouts"),
        lambda n: n["layouts"][0].update(kind="pipeline"),
        lambda n: n["layouts"][0].update(global_ids=[-1]),
        lambda n: n["layouts"][0].pop("rank"),
    ],
)
def test_malformed_names_are_index_corruption(edit) -> None:
    with pytest.raises(IndexCorruptError, match="metadata.names"):
        Index.from_json(_edited(edit), "ck")
