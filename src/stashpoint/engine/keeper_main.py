"""The keeper process's main loop: listen on the rank's socket, serve trainers, and leave
(persisting at the breakpoint) when none is left.  See :mod:`stashpoint.engine.keeper`.

Run as ``python -m stashpoint.engine.keeper_main ROOT RANK [--durable URL] ...``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
from multiprocessing.connection import Connection

from stashpoint.engine import keepers, memtier
from stashpoint.engine.keeper import FIRST_CONNECT_S, Keeper, KeeperConfig
from stashpoint.engine.writer import Writer


class _Terminated(Exception):
    """SIGTERM reached the keeper."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _listen(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with memtier.socket_address(path) as address:
        sock.bind(address)
    os.chmod(path, 0o600)
    sock.listen(4)
    return sock


def _accept(sock: socket.socket, timeout_s: float) -> Connection | None:
    ready, _, _ = select.select([sock], [], [], timeout_s)
    if not ready:
        return None
    conn, _ = sock.accept()
    conn.setblocking(True)
    return Connection(conn.detach())


def serve(config: KeeperConfig, writer_cls: type) -> str:
    """Serve trainers until released or left alone; returns why it stopped."""
    lock = keepers.take_lock(config.root, config.rank)
    if lock is None:
        return "another keeper holds this rank"
    keeper = Keeper(writer_cls, config)
    writer = keeper.writer
    writer.start()
    sock = _listen(memtier.keeper_socket(config.root, config.rank))
    signal.signal(signal.SIGTERM, _on_sigterm)
    ending, wait_s = "idle", FIRST_CONNECT_S
    try:
        while True:
            conn = _accept(sock, wait_s)
            if conn is None:
                ending = f"no trainer reattached within {wait_s:g}s"
                break
            how = writer.serve(conn, conn)
            conn.close()
            if how in ("release", "shutdown"):
                ending = "released"
                break
            preempted = keeper.preempt_timer is not None
            if preempted:
                ending = "the trainer exited after a preemption notice"
                break
            wait_s = config.reattach_s
    except _Terminated:
        ending = "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sock.close()
        writer.stop()  # finish queued seals and jobs first
        keeper.drain()
        if ending != "released":
            keeper.persist_breakpoint(ending)
        keeper.close()
        keepers.remove_rank(config.root, config.rank)
        os.close(lock)
    return ending


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="stashpoint-keeper")
    p.add_argument("root")
    p.add_argument("rank", type=int)
    p.add_argument("--durable")
    p.add_argument("--reattach", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--name", default="step-{step:09d}")
    a = p.parse_args(argv)
    config = KeeperConfig(
        root=a.root,
        rank=a.rank,
        durable=a.durable,
        reattach_s=a.reattach,
        timeout_s=a.timeout,
        checkpoint_name=a.name,
    )
    serve(config, Writer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
