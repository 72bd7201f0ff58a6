"""What protecting memory snapshots against a node loss costs on this machine (CPU).

For a snapshot of ``--mib`` MiB per rank, simulated nodes of one rank each (separate
memory roots under ``--shm``, default ``/dev/shm``), and each policy:

* the keeper-side protection time of one snapshot per rank (what ``Protector.protect``
  takes after the seal: whole-file checksums, then the replica writes or the XOR into
  the parity) and the *protection lag* (every rank sealed at
  the same moment; the lag is until the protection record of its replica or group is
  complete, as recorded in it; the keepers run one after another here, as they would
  on a machine of few cores);
* the memory each rank holds: its slots plus its node's share of the replicas/parities
  (``keep`` snapshots of protection, as many as the slots);
* the time to rebuild a lost rank's slot file from the protection, verified.

Each through the file system and over TCP on loopback (``--transports``: every node's
root served by a :class:`NodeServer`, as its keepers serve it).  Also the raw XOR
throughput of ``parity.xor_into``.  Usage::

    python benchmarks/protect_bench.py --mib 8 --nodes 4 --out benchmarks/results/protect-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, "src")
from stashpoint.engine import memtier
from stashpoint.engine.net_transport import TransportSpec, make_transport
from stashpoint.engine.node_server import NodeServer
from stashpoint.engine.parity import xor_into
from stashpoint.engine.protect import Protector, ProtectSetup
from stashpoint.engine.rebuild import held_bytes, inventory, rebuild
from stashpoint.engine.transport import FileTransport
from stashpoint.planning.protection import Parity, Replicate, node_ids, place, rebuild_candidates

BLOCK = 1 << 20
TOKEN = "protect-bench"


def xor_gbps(mib: int, repeats: int) -> float:
    a, b = bytearray(os.urandom(mib << 20)), os.urandom(mib << 20)
    xor_into(memoryview(a), memoryview(b))  # warm
    t0 = time.perf_counter()
    for _ in range(repeats):
        xor_into(memoryview(a), memoryview(b))
    return repeats * (mib << 20) / (time.perf_counter() - t0) / 1e9


def _manifest(rank: int, step: int, world: int, nbytes: int) -> memtier.Manifest:
    return memtier.Manifest(
        rank=rank,
        slot=0,
        step=step,
        save_id=f"bench-{step}",
        world_size=world,
        crc_block=BLOCK,
        file_size=nbytes,
        records=(),
    )


def _slots(base: str, nodes: tuple[int, ...], nbytes: int, slots: int) -> dict[int, bytes]:
    data = {}
    for rank, node in enumerate(nodes):
        root = os.path.join(base, f"node{node}")
        os.makedirs(memtier.rank_dir(root, rank), exist_ok=True)
        blob = os.urandom(nbytes)
        for slot in range(slots):
            with open(memtier.slot_data(root, rank, slot), "wb") as f:
                f.write(blob)
        m = _manifest(rank, 1, len(nodes), nbytes)
        memtier.write_manifest(root, m)
        data[rank] = blob
    return data


def _spec(kind: str, roots: dict[int, str], servers: dict[int, NodeServer]) -> TransportSpec:
    addresses = tuple((n, (s.address,)) for n, s in servers.items())
    return TransportSpec(
        kind=kind, roots=tuple(roots.items()), addresses=addresses, token=TOKEN, timeout_s=60
    )


def run_policy(policy, n_nodes: int, nbytes: int, slots: int, shm: str, transport: str = "files") -> dict:
    base = tempfile.mkdtemp(prefix="stashpoint-protect-bench-", dir=shm)
    servers: dict[int, NodeServer] = {}
    try:
        nodes = node_ids(n_nodes, 1)
        roots = {n: os.path.join(base, f"node{n}") for n in nodes}
        data = _slots(base, nodes, nbytes, slots)
        if transport == "sockets":  # each node's root served on loopback, as its keepers would
            servers = {n: NodeServer(r, TOKEN, "127.0.0.1", timeout_s=60) for n, r in roots.items()}
        spec = _spec(transport, roots, servers)
        placement = place(policy, nodes)
        secs, lags = [], []
        for step in range(1, slots + 1):  # as many protected snapshots as slots are kept
            sealed_at = time.time()  # every rank sealed at once; their keepers then run one after another
            for rank, blob in data.items():
                setup = ProtectSetup(
                    placement=placement.ranks[rank],
                    transport=spec,
                    keep=slots,
                    rate=None,
                    timeout_s=60,
                )
                m = _manifest(rank, step, n_nodes, nbytes)
                got = Protector(setup).protect(m, memoryview(blob), sealed_at)
                secs.append(got.seconds)
                if got.lag_s is not None:
                    lags.append(got.lag_s)
        held = sum(held_bytes(r) for r in roots.values())
        for rank in range(n_nodes):  # the newest snapshot is the one each rank's slot holds
            memtier.write_manifest(roots[rank], _manifest(rank, slots, n_nodes, nbytes))
        held_list = [
            h for n in nodes for h in inventory(roots[n], n) if not (h.kind == "slot" and h.rank == 0)
        ]
        cand = next(c for c in rebuild_candidates(held_list)[0] if c.step == slots)
        source = cand.lost[0][1][0]
        here = make_transport(spec, node=source.holding.node)  # the holder's node rebuilds
        t0 = time.perf_counter()
        rebuilt = rebuild(here, source, 0)
        rebuild_s = time.perf_counter() - t0
        with open(FileTransport(roots).local_path(rebuilt.node, rebuilt.path), "rb") as f:
            assert f.read() == data[0]
        return {
            "policy": repr(policy),
            "transport": transport,
            "protect_s_per_rank": sorted(secs)[len(secs) // 2],
            "lag_s": sorted(lags)[len(lags) // 2],
            "slot_bytes_per_rank": slots * nbytes,
            "protection_bytes_per_rank": held / n_nodes,
            "memory_per_rank_over_slots": (slots * nbytes + held / n_nodes) / (slots * nbytes),
            "rebuild_one_rank_s": rebuild_s,
        }
    finally:
        for server in servers.values():
            server.close()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=8)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--shm", default="/dev/shm")
    p.add_argument("--out")
    p.add_argument("--transports", default="files,sockets", help="files, sockets (TCP on loopback), or both")
    a = p.parse_args()
    out = {
        "machine": f"{os.cpu_count()} CPU cores",
        "snapshot_mib_per_rank": a.mib,
        "nodes": a.nodes,
        "slots": a.slots,
        "xor_gbps": xor_gbps(64, 10),
        "policies": [
            run_policy(pol, a.nodes, a.mib << 20, a.slots, a.shm, transport)
            for transport in a.transports.split(",")
            for pol in (Replicate(copies=1), Replicate(copies=2), Parity(group=2), Parity(group=3))
        ],
    }
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
