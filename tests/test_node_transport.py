"""Protection traffic over TCP: keepers' node servers and the socket transport, in one process.

Every node's memory root is served by a real :class:`NodeServer` on loopback; the same
checks run against the file-system transport, so both give the same bytes.  Then what a
peer must not do (no token, paths out of the root or into a rank's slots), what a lost or
silent node costs (a named error, in time), and a whole protect-and-rebuild over sockets.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from stashpoint import Parity, Replicate
from stashpoint.engine import memtier, node_server, wire
from stashpoint.engine.net_transport import (
    SocketTransport,
    TransportSpec,
    default_listen_host,
    make_transport,
    split_address,
)
from stashpoint.engine.node_server import NodeServer
from stashpoint.engine.node_view import NodeViewStorage
from stashpoint.engine.parity import PIECE_BYTES
from stashpoint.engine.protect import Protector, ProtectSetup
from stashpoint.engine.rebuild import inventory, rebuild
from stashpoint.engine.transport import FileTransport
from stashpoint.errors import ChecksumMismatchError, PeerConnectionError, ProtectionError, UnsafePathError
from stashpoint.planning.protection import node_ids, place, rebuild_candidates

TOKEN = "t0ken"
BLOCK = 4096


@pytest.fixture
def served(tmp_path):
    """Three node roots, each served on loopback; yields (roots, addresses)."""
    roots = {n: str(tmp_path / f"node{n}") for n in range(3)}
    servers = {}
    for n, r in roots.items():
        os.makedirs(r)
        servers[n] = NodeServer(r, TOKEN, "127.0.0.1", timeout_s=10)
    yield roots, {n: (s.address,) for n, s in servers.items()}
    for s in servers.values():
        s.close()


def _both(roots, addresses):
    """The same nodes through files and through sockets (no node local to the socket one)."""
    return FileTransport(roots), SocketTransport(addresses, TOKEN, timeout_s=10)


def test_socket_transport_gives_what_the_file_transport_gives(served) -> None:
    roots, addresses = served
    rng = random.Random(0)
    blob = bytes(rng.getrandbits(8) for _ in range(PIECE_BYTES + 12345))  # more than one piece
    other = bytes(rng.getrandbits(8) for _ in range(5000))
    for node, t in zip((1, 2), _both(roots, addresses)):
        t.write(node, "held-rank-00001/a.safetensors", memoryview(blob))
        t.write_text(node, "held-rank-00001/a.protect.json", '{"x": 1}')
        t.xor_into(node, "parity-g0-s0/p.parity", memoryview(blob))
        t.xor_into(node, "parity-g0-s0/p.parity", memoryview(other))
        assert t.read(node, "held-rank-00001/a.safetensors") == blob
        assert t.size(node, "held-rank-00001/a.safetensors") == len(blob)
        out = bytearray(100)
        assert t.read_into(node, "held-rank-00001/a.safetensors", len(blob) - 40, memoryview(out)) == 40
        assert bytes(out[:40]) == blob[-40:]
        assert t.listdir(node, "held-rank-00001") == ["a.protect.json", "a.safetensors"]
        assert t.listdir(node, "held-rank-00009") == []
        t.remove(node, "held-rank-00001/a.protect.json")
        t.remove(node, "held-rank-00001/never-written")
    files, sockets = _both(roots, addresses)
    assert files.read(1, "parity-g0-s0/p.parity") == sockets.read(2, "parity-g0-s0/p.parity")
    want = files.checksums(1, "held-rank-00001/a.safetensors", BLOCK)
    assert sockets.checksums(2, "held-rank-00001/a.safetensors", BLOCK) == want
    assert sockets.listdir(2, "held-rank-00001") == ["a.safetensors"]
    assert "node 2 (127.0.0.1:" in sockets.describe(2, "x")


def test_a_peer_without_the_token_is_refused_and_the_server_goes_on(served) -> None:
    roots, addresses = served
    intruder = SocketTransport(addresses, "not-the-token", timeout_s=5)
    with pytest.raises(PeerConnectionError, match="node 1: no keeper answers"):
        intruder.write_text(1, "held-rank-00000/x.protect.json", "{}")
    assert not os.path.exists(os.path.join(roots[1], "held-rank-00000"))
    SocketTransport(addresses, TOKEN, timeout_s=5).write_text(1, "held-rank-00000/x.protect.json", "{}")


@pytest.mark.parametrize(
    "path,why",
    [
        ("../node2/held-rank-00000/x", "not a normalised path"),
        ("/etc/passwd", "not a path inside"),
        ("held-rank-00000/../../x", "not a normalised path"),
        ("rank-00000/slot-0.safetensors", "not in a protection directory"),
        ("", "not a path inside"),
    ],
)
def test_a_peer_cannot_write_outside_the_protection_directories(served, path: str, why: str) -> None:
    roots, addresses = served
    t = SocketTransport(addresses, TOKEN, timeout_s=5)
    with pytest.raises(UnsafePathError, match=why):
        t.write(1, path, memoryview(b"x" * 10))
    with pytest.raises(UnsafePathError):
        t.remove(1, path)
    assert sorted(os.listdir(roots[1])) == []


def test_a_link_out_of_the_root_is_not_followed(served, tmp_path) -> None:
    roots, addresses = served
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(roots[1], "held-rank-00003"))
    t = SocketTransport(addresses, TOKEN, timeout_s=5)
    with pytest.raises(UnsafePathError, match="resolves outside the memory root"):
        t.write(1, "held-rank-00003/x.safetensors", memoryview(b"x"))
    (outside / "secret").write_bytes(b"s")
    with pytest.raises(UnsafePathError, match="resolves outside the memory root"):
        t.read(1, "held-rank-00003/secret")
    assert os.listdir(outside) == ["secret"]
    os.makedirs(os.path.join(roots[1], "held-rank-00004"))
    os.symlink(outside / "secret", os.path.join(roots[1], "held-rank-00004", "x.safetensors"))
    for read in (t.read, t.size, lambda n, p: t.checksums(n, p, BLOCK)):
        with pytest.raises(ProtectionError, match="a link, not a file of the memory root"):
            read(1, "held-rank-00004/x.safetensors")


def test_a_lost_node_is_a_named_error_in_time(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    t = SocketTransport({4: (dead,)}, TOKEN, timeout_s=5)
    with pytest.raises(PeerConnectionError, match=f"node 4: no keeper answers .*{dead}"):
        t.read(4, "held-rank-00000/x")
    with pytest.raises(PeerConnectionError, match="node 5: no keeper answers"):
        t.read(5, "held-rank-00000/x")
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never speaks
    try:
        t = SocketTransport({6: (f"127.0.0.1:{silent.getsockname()[1]}",)}, TOKEN, timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(PeerConnectionError, match="no answer within 0.5s"):
            t.listdir(6, "held-rank-00000")
        assert time.monotonic() - t0 < 5
    finally:
        silent.close()


def test_the_second_address_of_a_node_serves_when_the_first_is_gone(served) -> None:
    roots, addresses = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    t = SocketTransport({1: (dead, addresses[1][0])}, TOKEN, timeout_s=5)
    t.write_text(1, "held-rank-00000/x.protect.json", "{}")
    assert t.listdir(1, "held-rank-00000") == ["x.protect.json"]


def test_a_piece_damaged_in_transit_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)
        b.settimeout(5)
        data = bytearray(b"y" * 1000)
        sender = threading.Thread(target=wire.send_payload, args=(a, memoryview(data), "test"))
        sender.start()
        got = bytearray(1000)

        def take(offset: int, piece: memoryview) -> None:
            got[offset : offset + len(piece)] = piece

        wire.recv_pieces(b, 1000, "test", take)
        sender.join()
        assert got == data
        a.sendall(b"z" * 10 + (123).to_bytes(4, "big"))  # a piece whose checksum does not match
        with pytest.raises(ChecksumMismatchError, match="damaged in transit"):
            wire.recv_pieces(b, 10, "test", lambda off, p: None)


def test_a_stripe_lock_is_held_by_its_connection(served) -> None:
    roots, addresses = served
    t = SocketTransport(addresses, TOKEN, timeout_s=5)
    with t.lock(2, "parity-g00000-s00000", timeout_s=1):
        with pytest.raises(ProtectionError, match="not locked within 0.2s"):
            with t.lock(2, "parity-g00000-s00000", timeout_s=0.2):
                pass
        with pytest.raises(ProtectionError, match="not locked"):  # the file transport sees it too
            with FileTransport(roots).lock(2, "parity-g00000-s00000", timeout_s=0.2):
                pass
    with t.lock(2, "parity-g00000-s00000", timeout_s=1):
        pass


def _slot(root: str, rank: int, step: int, blob: bytes, world: int) -> memtier.Manifest:
    os.makedirs(memtier.rank_dir(root, rank), exist_ok=True)
    with open(memtier.slot_data(root, rank, 0), "wb") as f:
        f.write(blob)
    m = memtier.Manifest(
        rank=rank,
        slot=0,
        step=step,
        save_id=f"save-{step}",
        world_size=world,
        crc_block=BLOCK,
        file_size=len(blob),
        records=(),
    )
    memtier.write_manifest(root, m)
    return m


@pytest.mark.parametrize("policy", [Replicate(copies=1), Parity(group=2)])
def test_protect_and_rebuild_over_sockets(served, policy) -> None:
    """Three nodes of one rank: each keeper protects through its own transport (its node by
    path, the others by socket); each lost rank is rebuilt and read through a node view."""
    roots, addresses = served
    spec = TransportSpec(
        kind="sockets",
        roots=tuple(roots.items()),
        addresses=tuple(addresses.items()),
        token=TOKEN,
        timeout_s=10,
    )
    nodes = node_ids(3, 1)
    placement = place(policy, nodes)
    rng = random.Random(1)
    blobs = {r: bytes(rng.getrandbits(8) for _ in range(3 * BLOCK + 100 * r)) for r in range(3)}
    manifests = {}
    for rank, blob in blobs.items():
        manifests[rank] = _slot(roots[rank], rank, 7, blob, 3)
        setup = ProtectSetup(placement=placement.ranks[rank], transport=spec, keep=2, rate=None, timeout_s=10)
        got = Protector(setup).protect(manifests[rank], memoryview(blob), time.time())
        assert got.bytes_sent == len(blob)
    held = [h for n, r in roots.items() for h in inventory(r, n)]
    for lost in range(3):
        alive = [h for h in held if not (h.kind == "slot" and h.rank == lost)]
        (cand,), beyond = rebuild_candidates(alive)
        assert not beyond
        source = cand.lost[0][1][0]
        here = make_transport(spec, node=source.holding.node)  # the other members are remote
        got = rebuild(here, source, lost)
        elsewhere = make_transport(spec, node=(source.holding.node + 1) % 3)
        assert elsewhere.read(got.node, got.path)[: len(blobs[lost])] == blobs[lost]
        view = NodeViewStorage(elsewhere, {"data": (got.node, got.path)}, "{}")  # what a load reads
        assert view.read_range("/snapshot/data", 5, 105) == blobs[lost][5:105]
        if policy.kind == "parity":
            with pytest.raises(ProtectionError, match="reached over the network"):
                rebuild(elsewhere, source, lost)  # a parity is rebuilt on its own node
        here.remove(got.node, "rebuilt")


def test_reads_reuse_a_connection_and_survive_its_close(tmp_path) -> None:
    """Reads share one connection; when the keeper has closed it (idle past its timeout),
    the read goes again over a new one."""
    server = NodeServer(str(tmp_path), TOKEN, "127.0.0.1", timeout_s=0.3)
    try:
        t = SocketTransport({1: (server.address,)}, TOKEN, timeout_s=5)
        t.write_text(1, "held-rank-00000/x.protect.json", "{}")  # a write: a connection of its own
        assert t.listdir(1, "held-rank-00000") == ["x.protect.json"]
        assert t.size(1, "held-rank-00000/x.protect.json") == 2
        assert server.accepted == 2
        time.sleep(0.6)  # the keeper closes the idle connection
        assert t.size(1, "held-rank-00000/x.protect.json") == 2
        assert server.accepted == 3
        with pytest.raises(ProtectionError, match="no such file"):
            t.size(1, "held-rank-00000/missing")
        t.close()
    finally:
        server.close()


def test_keepers_listen_toward_the_rendezvous_host(monkeypatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert default_listen_host() == "127.0.0.1"
    monkeypatch.delenv("MASTER_ADDR")
    assert default_listen_host() == socket.gethostname()


def test_a_stranger_that_never_answers_the_challenge_is_dropped(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(node_server, "HANDSHAKE_TIMEOUT_S", 0.2)
    server = NodeServer(str(tmp_path), TOKEN, "127.0.0.1", timeout_s=30)
    try:
        with socket.create_connection(split_address(server.address), timeout=5) as s:
            s.recv(64)  # the challenge; no answer follows
            t0 = time.monotonic()
            assert s.recv(64) == b""  # closed by the keeper
            assert time.monotonic() - t0 < 5
    finally:
        server.close()


def test_a_keeper_listens_on_ipv6_too(tmp_path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        server = NodeServer(str(tmp_path), TOKEN, "::1", timeout_s=5)
    except ProtectionError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert server.address.startswith("[::1]:")
        t = SocketTransport({1: (server.address,)}, TOKEN, timeout_s=5)
        t.write_text(1, "held-rank-00000/x.protect.json", "{}")
        assert t.listdir(1, "held-rank-00000") == ["x.protect.json"]
        t.close()
    finally:
        server.close()

