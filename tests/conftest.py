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
