"""Protection of memory snapshots, piece by piece: policies, placement, the rebuild choice,
replicas and parity written and rebuilt through the file-system transport (real files in
separate roots standing for nodes), damage detection, retention, pacing."""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stashpoint import MemoryPolicy, Parity, Replicate
from stashpoint.engine import memtier
from stashpoint.engine.net_transport import TransportSpec
from stashpoint.engine.parity import PIECE_BYTES, Pacer, xor_into
from stashpoint.engine.protect import Protector, ProtectSetup
from stashpoint.engine.protect_store import check_blocks
from stashpoint.engine.rebuild import held_bytes, inventory, rebuild
from stashpoint.engine.transport import FileTransport
from stashpoint.errors import ChecksumMismatchError, InvalidOptionError, ProtectionError
from stashpoint.planning.protection import Holding, Source, node_ids, place, rebuild_candidates

BLOCK = 4096


@pytest.mark.parametrize(
    "make",
    [
        lambda: Replicate(copies=0),
        lambda: Replicate(copies=True),
        lambda: Parity(group=1),
        lambda: Parity(kind="replicate"),
        lambda: Replicate(max_rate="fast"),
        lambda: Parity(max_rate=0),
        lambda: MemoryPolicy(protection="parity"),
        lambda: MemoryPolicy(protection=Parity(), ranks_per_node=0),
    ],
)
def test_bad_protection_options_are_refused_by_name(make) -> None:
    with pytest.raises(InvalidOptionError):
        make()


@pytest.mark.parametrize("n_nodes,per_node", [(2, 1), (3, 2), (5, 1), (6, 3)])
def test_replicas_go_to_other_nodes_never_twice_to_one(n_nodes: int, per_node: int) -> None:
    nodes = node_ids(n_nodes * per_node, per_node)
    for copies in range(1, n_nodes):
        placement = place(Replicate(copies=copies), nodes)
        assert placement.unprotected is None
        for p in placement.ranks:
            assert p.node not in p.targets and len(set(p.targets)) == copies
    assert "needs" in place(Replicate(copies=n_nodes), nodes).unprotected


@pytest.mark.parametrize("n_nodes,per_node", [(3, 1), (4, 2), (5, 1), (7, 2), (8, 1)])
def test_parity_lies_outside_its_group_and_stripes_share_a_local_index(n_nodes: int, per_node: int) -> None:
    nodes = node_ids(n_nodes * per_node, per_node)
    for g in range(2, n_nodes):
        placement = place(Parity(group=g), nodes)
        assert placement.unprotected is None
        for p in placement.ranks:
            group_nodes = {nodes[m] for m in p.members}
            assert p.targets[0] not in group_nodes and len(group_nodes) == len(p.members) <= g
            assert {m % per_node for m in p.members} == {p.rank % per_node}
            assert all(placement.ranks[m].stripe == p.stripe for m in p.members)
    assert "needs" in place(Parity(group=n_nodes), nodes).unprotected


def _h(kind, node, rank, step=5, members=(), world=3) -> Holding:
    return Holding(
        kind=kind,
        node=node,
        step=step,
        save_id=f"id{step}",
        world_size=world,
        rank=rank,
        path=f"{kind}-{rank}",
        members=members,
    )


def test_rebuild_choice_prefers_replicas_then_parity_and_names_what_is_beyond() -> None:
    held = [
        _h("slot", 0, 0),
        _h("slot", 1, 1),
        _h("replica", 0, 2),
        _h("parity", 1, -1, members=(0, 2)),
        _h("slot", 0, 0, step=4),
        _h("parity", 0, -1, step=4, members=(1, 2)),
    ]
    good, bad = rebuild_candidates(held)
    assert [c.step for c in good] == [5] and [(u.step, u.ranks) for u in bad] == [(4, (1, 2))]
    ((rank, sources),) = good[0].lost
    assert rank == 2 and [s.holding.kind for s in sources] == ["replica", "parity"]
    assert [o.rank for o in sources[1].others] == [0]
    assert rebuild_candidates(held, newer_than=6) == ([], [])


def _manifest(rank: int, step: int, size: int, world: int) -> memtier.Manifest:
    return memtier.Manifest(
        rank=rank,
        slot=0,
        step=step,
        save_id=f"save-{step}",
        world_size=world,
        crc_block=BLOCK,
        file_size=size,
        records=(),
    )


def _setup(tmp_path, policy, nodes: tuple[int, ...], rank: int, keep: int = 2) -> ProtectSetup:
    roots = {n: str(tmp_path / f"node{n}") for n in set(nodes)}
    return ProtectSetup(
        placement=place(policy, nodes).ranks[rank],
        transport=TransportSpec(kind="files", roots=tuple(roots.items())),
        keep=keep,
        rate=None,
        timeout_s=5.0,
    )


def _slots(tmp_path, nodes, sizes, step, seed=0):
    """Each rank's slot file of ``step`` in its node's root, random bytes; returns the data."""
    rng = random.Random(seed + step)
    data = {}
    for rank, size in enumerate(sizes):
        blob = bytes(rng.getrandbits(8) for _ in range(size))
        root = str(tmp_path / f"node{nodes[rank]}")
        os.makedirs(memtier.rank_dir(root, rank), exist_ok=True)
        with open(memtier.slot_data(root, rank, 0), "wb") as f:
            f.write(blob)
        memtier.write_manifest(root, _manifest(rank, step, size, len(sizes)))
        data[rank] = blob
    return data


def _protect_all(tmp_path, policy, nodes, data, step, keep=2):
    for rank, blob in data.items():
        prot = Protector(_setup(tmp_path, policy, nodes, rank, keep))
        prot.protect(_manifest(rank, step, len(blob), len(nodes)), memoryview(blob), time.time())


def _holdings(tmp_path, nodes):
    return [h for n in sorted(set(nodes)) for h in inventory(str(tmp_path / f"node{n}"), n)]


def test_parity_rebuilds_whichever_member_is_lost(tmp_path) -> None:
    nodes = (0, 1, 2, 3)  # group {0, 1, 2}, parity on node 3; group {3}, parity on node 0
    sizes = [3 * BLOCK + 17, 5 * BLOCK, 40]
    data = _slots(tmp_path, nodes, [*sizes, 1000], step=1)
    _protect_all(tmp_path, Parity(group=3), nodes, data, step=1)
    transport = FileTransport({n: str(tmp_path / f"node{n}") for n in nodes})
    held = _holdings(tmp_path, nodes)
    for lost in range(3):
        alive = [h for h in held if not (h.kind == "slot" and h.rank == lost)]
        (cand,), bad = rebuild_candidates(alive)
        assert not bad and [r for r, _ in cand.lost] == [lost]
        got = rebuild(transport, cand.lost[0][1][0], lost)
        with open(transport.local_path(got.node, got.path), "rb") as f:
            assert f.read() == data[lost]
        assert memtier.manifest_from_json(got.manifest.encode(), "m").rank == lost
    # two members of one group lost: beyond the protection
    alive = [h for h in held if not (h.kind == "slot" and h.rank in (0, 1))]
    good, bad = rebuild_candidates(alive)
    assert good == [] and [u.ranks for u in bad] == [(0, 1)]


def test_damaged_parity_or_member_slot_is_named_not_rebuilt(tmp_path) -> None:
    nodes = (0, 1, 2)
    data = _slots(tmp_path, nodes, [2 * BLOCK, 2 * BLOCK, BLOCK], step=1)
    _protect_all(tmp_path, Parity(group=2), nodes, data, step=1)
    transport = FileTransport({n: str(tmp_path / f"node{n}") for n in nodes})
    held = [h for h in _holdings(tmp_path, nodes) if not (h.kind == "slot" and h.rank == 0)]
    source = next(s for r, ss in rebuild_candidates(held)[0][0].lost for s in ss)
    slot1 = transport.local_path(source.others[0].node, source.others[0].path)
    _flip(slot1, BLOCK + 5)
    with pytest.raises(ChecksumMismatchError, match=f"{slot1}: block 1 "):
        rebuild(transport, source, 0)
    _flip(slot1, BLOCK + 5)
    parity = transport.local_path(source.holding.node, source.holding.path)
    _flip(parity, 7)
    with pytest.raises(ChecksumMismatchError, match=f"{parity}: block 0 "):
        rebuild(transport, source, 0)


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_incomplete_parity_protects_nothing(tmp_path) -> None:
    nodes = (0, 1, 2)
    data = _slots(tmp_path, nodes, [BLOCK, BLOCK, BLOCK], step=1)
    _protect_all(tmp_path, Parity(group=2), nodes, {0: data[0]}, step=1)  # rank 1 never contributed
    held = [h for h in _holdings(tmp_path, nodes) if not (h.kind == "slot" and h.rank == 0)]
    assert not any(h.kind == "parity" for h in held)
    assert rebuild_candidates(held)[0] == []


def test_replicas_keep_the_newest_snapshots_and_drop_an_abandoned_timeline(tmp_path) -> None:
    nodes = (0, 1)
    for step in range(1, 5):
        data = _slots(tmp_path, nodes, [BLOCK + step, 2 * BLOCK], step=step)
        _protect_all(tmp_path, Replicate(copies=1), nodes, data, step=step, keep=2)
    held = _holdings(tmp_path, nodes)
    assert sorted(h.step for h in held if h.kind == "replica" and h.rank == 0) == [3, 4]
    assert held_bytes(str(tmp_path / "node1")) >= (BLOCK + 3) + (BLOCK + 4)
    # a restart that went back to step 3 and took it again: the old 3 and 4 go
    m = _manifest(0, 3, BLOCK, 2)
    m = memtier.Manifest(**{**m.__dict__, "save_id": "other-timeline"})
    Protector(_setup(tmp_path, Replicate(copies=1), nodes, 0)).protect(
        m, memoryview(b"x" * BLOCK), time.time()
    )
    replicas = [h for h in _holdings(tmp_path, nodes) if h.kind == "replica" and h.rank == 0]
    assert [(h.step, h.save_id) for h in replicas] == [(3, "other-timeline")]
    transport = FileTransport({n: str(tmp_path / f"node{n}") for n in nodes})
    got = rebuild(transport, Source(holding=replicas[0]), 0)
    assert open(transport.local_path(got.node, got.path), "rb").read() == b"x" * BLOCK


def test_protection_record_reports_the_lag(tmp_path) -> None:
    nodes = (0, 1)
    data = _slots(tmp_path, nodes, [BLOCK, BLOCK], step=1)
    prot = Protector(_setup(tmp_path, Replicate(copies=1), nodes, 0))
    got = prot.protect(_manifest(0, 1, BLOCK, 2), memoryview(data[0]), time.time() - 2.0)
    assert got.lag_s >= 2.0 and got.bytes_sent == BLOCK and got.seconds >= 0


def test_xor_is_its_own_inverse_and_pacing_holds_the_rate() -> None:
    a, b = bytearray(os.urandom(1 << 20)), os.urandom(1 << 19)
    orig = bytes(a)
    xor_into(memoryview(a), memoryview(b))
    assert a[: len(b)] != orig[: len(b)] and a[len(b) :] == orig[len(b) :]
    xor_into(memoryview(a), memoryview(b))
    assert a == orig
    pacer, t0 = Pacer(10_000_000), time.monotonic()
    for _ in range(4):
        pacer.took(1_000_000)
    assert time.monotonic() - t0 >= 0.35
    with pytest.raises(ChecksumMismatchError, match="where: block 2 "):
        check_blocks([1, 2, 3], (1, 2, 4), "where", BLOCK)


@pytest.mark.parametrize("n,g", list(itertools.product([3, 4, 5], [2, 3])))
def test_every_rank_is_protected_by_exactly_one_parity(n: int, g: int) -> None:
    placement = place(Parity(group=g), node_ids(n, 1))
    if n <= g:
        assert placement.unprotected
        return
    for p in placement.ranks:
        assert sum(p.rank in q.members for q in placement.ranks if q.stripe == p.stripe) == len(p.members)


def test_a_damaged_replica_is_named_and_the_next_replica_rebuilds(tmp_path) -> None:
    nodes = (0, 1, 2)
    data = _slots(tmp_path, nodes, [2 * BLOCK + 3, BLOCK, BLOCK], step=1)
    _protect_all(tmp_path, Replicate(copies=2), nodes, data, step=1)
    held = [h for h in _holdings(tmp_path, nodes) if not (h.kind == "slot" and h.rank == 0)]
    (cand,), _ = rebuild_candidates(held)
    ((rank, sources),) = cand.lost
    assert rank == 0 and [s.holding.node for s in sources] == [1, 2]  # both replicas, never on node 0
    transport = FileTransport({n: str(tmp_path / f"node{n}") for n in nodes})
    first = transport.local_path(sources[0].holding.node, sources[0].holding.path)
    _flip(first, 2 * BLOCK + 1)
    with pytest.raises(ChecksumMismatchError, match=f"{first}: block 2 "):
        rebuild(transport, sources[0], 0)
    got = rebuild(transport, sources[1], 0)
    with open(transport.local_path(got.node, got.path), "rb") as f:
        assert f.read() == data[0]


def test_max_rate_paces_the_protection_traffic(tmp_path) -> None:
    nodes = (0, 1)
    data = _slots(tmp_path, nodes, [2_000_000, BLOCK], step=1)
    setup = _setup(tmp_path, Replicate(copies=1, max_rate="10MB"), nodes, 0)
    paced = ProtectSetup(**{**setup.__dict__, "rate": Replicate(copies=1, max_rate="10MB").rate})
    got = Protector(paced).protect(_manifest(0, 1, 2_000_000, 2), memoryview(data[0]), time.time())
    assert paced.rate == 10_000_000 and got.seconds >= 0.15 and got.bytes_sent == 2_000_000


def test_transport_writes_never_follow_a_planted_link(tmp_path):
    root = tmp_path / "node0"
    (root / "held").mkdir(parents=True)
    t = FileTransport({0: str(root)})
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    os.symlink(outside, root / "held" / "x.part")  # a link where the writer stages its file
    os.symlink(outside, root / "held" / "p")
    with pytest.raises(ProtectionError, match="x.part: cannot be written"):
        t.write(0, "held/x", memoryview(b"data"))
    with pytest.raises(ProtectionError, match="held/p: cannot be written"):
        t.xor_into(0, "held/p", memoryview(b"data"))
    assert outside.read_bytes() == b"keep"


def test_members_xor_into_one_parity_at_once(tmp_path) -> None:
    """Three members of a stripe contribute at the same moment, on the pool's threads, with
    slots of other lengths (over several pieces): the parity is the XOR of all three, the
    record complete, and each member rebuilds from it."""
    nodes = (0, 1, 2, 3)
    rng = np.random.default_rng(5)
    sizes = [PIECE_BYTES * 9 + 123, PIECE_BYTES * 8, PIECE_BYTES * 3 + 7]  # over PARALLEL_MIN_BYTES
    data = {r: rng.integers(0, 256, n, dtype=np.uint8).tobytes() for r, n in enumerate(sizes)}
    data[3] = b"z" * 100
    for rank, blob in data.items():
        root = str(tmp_path / f"node{nodes[rank]}")
        os.makedirs(memtier.rank_dir(root, rank), exist_ok=True)
        with open(memtier.slot_data(root, rank, 0), "wb") as f:
            f.write(blob)
        memtier.write_manifest(root, _manifest(rank, 1, len(blob), 4))
    setups = {r: _setup(tmp_path, Parity(group=3), nodes, r) for r in range(3)}
    barrier = threading.Barrier(3)

    def contribute(rank: int) -> None:
        barrier.wait()
        m = _manifest(rank, 1, len(data[rank]), 4)
        Protector(setups[rank]).protect(m, memoryview(data[rank]), time.time())

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(contribute, range(3)))
    want = np.zeros(max(sizes), dtype=np.uint8)
    for r in range(3):
        want[: sizes[r]] ^= np.frombuffer(data[r], dtype=np.uint8)
    held = _holdings(tmp_path, nodes)
    (parity,) = [h for h in held if h.kind == "parity" and h.node == 3]
    with open(os.path.join(tmp_path, "node3", parity.path), "rb") as f:
        assert f.read() == want.tobytes()
    transport = FileTransport({n: str(tmp_path / f"node{n}") for n in nodes})
    for lost in range(3):
        alive = [h for h in held if not (h.kind == "slot" and h.rank == lost)]
        got = rebuild(transport, rebuild_candidates(alive)[0][0].lost[0][1][0], lost)
        with open(transport.local_path(got.node, got.path), "rb") as f:
            assert f.read() == data[lost]
