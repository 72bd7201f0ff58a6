"""Property tests: any layout saved at world size N loads bit-exactly at world size M."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dist_cases

MESHES = {1: [(1,)], 2: [(2,), (1, 2), (2, 1)], 3: [(3,)], 4: [(4,), (2, 2)]}


@st.composite
def layouts(draw, world: int, ndim: int):
    if draw(st.booleans()) and world >= 1 and draw(st.integers(0, 4)) == 0:
        return None  # a plain tensor, replicated on every rank
    mesh = draw(st.sampled_from(MESHES[world]))
    kinds = []
    for _ in mesh:
        if ndim and draw(st.booleans()):
            kinds.append(("S", draw(st.integers(0, ndim - 1))))
        else:
            kinds.append(("R", 0))
    return {"mesh": list(mesh), "placements": kinds}


@st.composite
def cases(draw):
    save_world = draw(st.integers(1, 4))
    load_world = draw(st.integers(1, 4))
    tensors = []
    for _ in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(0, 3))
        shape = [draw(st.integers(1, 9)) for _ in range(ndim)]
        tensors.append(
            {
                "shape": shape,
                "dtype": draw(st.sampled_from(sorted(dist_cases.DTYPES))),
                "seed": draw(st.integers(0, 2**31)),
                "save": draw(layouts(save_world, ndim)),
                "load": draw(layouts(load_world, ndim)),
            }
        )
    return {
        "save_world": save_world,
        "load_world": load_world,
        "tensors": tensors,
        "step": draw(st.integers(0, 99)),
    }


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_save_at_n_load_at_m_is_bit_exact(pools, tmp_path_factory, case):
    path = str(tmp_path_factory.mktemp("reshard") / "ckpt")
    pools(case["save_world"]).run(dist_cases.save_case, case, path)
    results = pools(case["load_world"]).run(dist_cases.load_case, case, path)
    for rank, r in enumerate(results):
        assert r["mismatches"] == [], f"rank {rank} got wrong data for {r['mismatches']} in {case}"
        assert r["step"] == case["step"]
