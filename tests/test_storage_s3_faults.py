"""Faults against the real S3 server: injected 5xx and slow answers, a gateway killed mid-save.

Whatever happens, a save either succeeds with the right bytes or fails with a named
error, and never leaves a committed-but-incomplete checkpoint.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import stashpoint
from s3_proxy import Fault, S3Proxy, is_get, is_part_upload
from stashpoint.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    StorageUnavailableError,
)
from stashpoint.storage import resolve

MiB = 1 << 20


@pytest.fixture
def proxy(s3_server):
    p = S3Proxy(s3_server.endpoint)
    yield p
    p.close()


def _state(seed: int = 0, mib: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = mib * MiB // 4 // 2
    return {"a": torch.randn(n, generator=g), "b": torch.randn(n, generator=g), "step": seed}


def _same(got: dict, want: dict) -> bool:
    return all(torch.equal(got[k], want[k]) for k in ("a", "b"))


def _url(s3_server, proxy, **opts) -> str:
    query = "&".join([f"endpoint={proxy.endpoint}", "part_size=5MiB", *(f"{k}={v}" for k, v in opts.items())])
    return s3_server.url("ckpt", query=query)


def _no_uploads_left(s3_server, url: str) -> bool:
    key = resolve(url)[1]
    got = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket, Prefix=key)
    return not got.get("Uploads")


def _not_committed(url: str) -> None:
    with pytest.raises((IncompleteCheckpointError, CheckpointNotFoundError)):
        stashpoint.load_full(url)


def test_injected_5xx_are_retried(s3_server, proxy):
    proxy.faults = [
        Fault(is_part_upload, count=3, status=503),
        Fault(is_get, count=2, status=500),
        Fault(lambda m, p: m == "POST" and "uploadId=" in p, count=1, status=503),  # complete
    ]
    url = _url(s3_server, proxy)
    state = _state(1)
    stashpoint.save(state, url)
    got = stashpoint.load_full(url)
    assert _same(got, state)
    assert [f.hits for f in proxy.faults] == [3, 2, 1]


def test_slow_responses_time_out_and_are_retried(s3_server, proxy):
    proxy.faults = [
        Fault(is_part_upload, count=1, status=0, delay_s=2.5),
        Fault(is_get, count=2, status=0, delay_s=2.5),
    ]
    url = _url(s3_server, proxy, read_timeout=1)
    state = _state(2, mib=12)
    t0 = time.monotonic()
    stashpoint.save(state, url)
    assert _same(stashpoint.load_full(url), state)
    assert [f.hits for f in proxy.faults] == [1, 2]
    assert time.monotonic() - t0 < 60


def test_persistent_5xx_fail_cleanly_within_the_deadline(s3_server, proxy):
    proxy.faults = [Fault(is_part_upload, count=10_000, status=500)]
    url = _url(s3_server, proxy, retry_deadline=3)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"uploading part of s3://.*kept failing"):
        stashpoint.save(_state(3), url)
    assert time.monotonic() - t0 < 30
    _not_committed(url)
    assert _no_uploads_left(s3_server, url)  # the failed upload was aborted


def _kill_after_parts(s3_server, proxy, parts: int, restart_after_s: float | None) -> threading.Event:
    """Kill the gateway when the ``parts``-th part upload arrives; maybe restart it later."""
    if not s3_server.managed:
        pytest.skip("the gateway is not run by scripts/s3-server here; cannot kill it")
    seen, killed = [0], threading.Event()
    lock = threading.Lock()

    def on_request(method: str, path: str) -> None:
        with lock:
            if not is_part_upload(method, path) or killed.is_set():
                return
            seen[0] += 1
            if seen[0] < parts:
                return
            s3_server.kill_gateway()
            killed.set()
        if restart_after_s is not None:
            threading.Timer(restart_after_s, s3_server.start_gateway).start()

    proxy.on_request = on_request
    return killed


def test_gateway_killed_mid_upload_and_back_save_succeeds(s3_server, proxy):
    killed = _kill_after_parts(s3_server, proxy, parts=3, restart_after_s=2.0)
    url = _url(s3_server, proxy, max_attempts=40)
    state = _state(4)
    try:
        stashpoint.save(state, url)
    finally:
        proxy.on_request = None
        s3_server.start_gateway()  # idempotent: make sure it is up for the next tests
    assert killed.is_set()
    assert _same(stashpoint.load_full(url), state)


def test_gateway_killed_mid_upload_for_good_save_fails_uncommitted(s3_server, proxy):
    killed = _kill_after_parts(s3_server, proxy, parts=3, restart_after_s=None)
    url = _url(s3_server, proxy, retry_deadline=4, max_attempts=100)
    try:
        with pytest.raises(StorageUnavailableError, match="kept failing"):
            with pytest.warns(RuntimeWarning):  # retrying, then: the abort could not reach it
                stashpoint.save(_state(5), url)
    finally:
        proxy.on_request = None
        s3_server.start_gateway()
    assert killed.is_set()
    _not_committed(url)
    storage, key = resolve(url)
    assert not storage.exists(storage.join(key, "index.json"))
    # what the aborted writer could not clean up while the gateway was down
    storage.abort_incomplete_uploads(key)
    assert _no_uploads_left(s3_server, url)

