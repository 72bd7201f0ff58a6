"""The random number generators of this process, as JSON values and tensors (no pickle).

``capture_rng()`` returns a dict that ``stashpoint.save`` stores without pickle (wrap it
in :class:`~stashpoint.PerRank`: every rank has its own), and ``restore_rng`` puts it
back.  It covers Python's ``random``, NumPy's global generator (when NumPy is
installed), torch's CPU generator and every device generator of the current
accelerator (CUDA, XPU, ...).
"""

from __future__ import annotations

import random

import torch

try:
    import numpy as np
except ImportError:  # NumPy is optional for torch
    np = None


def _accelerator() -> str | None:
    """The device type whose generators are saved (``"cuda"``, ``"xpu"``, ...), or None."""
    if not torch.accelerator.is_available():
        return None
    return torch.accelerator.current_accelerator().type


def capture_rng() -> dict:
    """This process's generator states: plain values and tensors, copied (safe to keep)."""
    states: dict = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        states["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    device = _accelerator()
    if device is not None:
        states[device] = list(torch.get_device_module(device).get_rng_state_all())
    return states


def restore_rng(states: dict) -> None:
    """Set the generators from what :func:`capture_rng` returned (here or in an earlier run).

    Device generators are set for the devices present (as many as both runs have).
    """
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if np is not None and "numpy" in states:
        n = states["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    device = _accelerator()
    if device is not None and device in states:
        module = torch.get_device_module(device)
        for index, state in enumerate(states[device][: module.device_count()]):
            module.set_rng_state(state, index)
