import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# fault-injecting storage for every process, the background writer included
os.environ["STASHPOINT_STORAGE_PLUGINS"] = "faulty_storage"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")) if p
)

from rankpool import RankPool

_POOLS: dict[int, RankPool] = {}


@pytest.fixture(scope="session")
def pools():
    """``pools(n)`` gives the session's pool of ``n`` ranks, started on first use."""

    def get(n: int) -> RankPool:
        pool = _POOLS.get(n)
        if pool is None or not pool.alive:
            pool = _POOLS[n] = RankPool(n)
        return pool

    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


# --- the real S3 server (Ceph RGW) -----------------------------------------------------

_S3: dict = {}


@pytest.fixture(scope="session")
def s3_server():
    """The session's S3 server with a fresh bucket; AWS_* variables point at it.

    See tests/s3_server.py for how it is found or started, and when tests skip.
    """
    import s3_server as s3mod

    if "server" not in _S3:
        _S3["server"] = s3mod.find()
    server = _S3["server"]
    if isinstance(server, str):
        s3mod.skip_or_fail(server)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.client().create_bucket(Bucket=server.bucket)
    yield server
    try:
        from stashpoint.storage.s3 import S3Storage

        S3Storage(server.bucket).delete("")
        server.client().delete_bucket(Bucket=server.bucket)
    except Exception:
        pass  # the server may be going away; its data dir is temporary anyway
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3mod.stop(server)
