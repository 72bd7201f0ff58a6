"""Manager behaviour specific to object-store roots: telemetry placement, saves in flight
(marker commits make them visible), and leaked multipart uploads."""

from __future__ import annotations

import threading
import time
import warnings

import torch

from s3_proxy import Fault, S3Proxy
from stashpoint.manager import CheckpointManager, RetentionPolicy
from stashpoint.storage import resolve


def _state(value: float, n: int = 1) -> dict:
    return {f"w{i}": torch.full((2048, 1024), value) for i in range(n)} | {"step": int(value)}


def test_no_telemetry_file_appears_in_the_working_directory(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = CheckpointManager(s3_server.url("run"), mode="sync")
    assert manager.telemetry_path is None
    manager.save(1, _state(1))
    manager.close()
    assert list(tmp_path.iterdir()) == []


def test_own_save_in_flight_is_not_reported_as_broken(s3_server):
    """While an asynchronous save waits for its index to land, this manager stays quiet about
    it and another manager (whose save it is not) warns as before.

    A proxy holds the index PUT back for a few seconds, so the uncommitted state is
    certain to be seen.  The save runs in a thread of this process (a synchronous save:
    the background writer process may have been started before the S3 settings were in
    the environment), so only warnings about the checkpoint in flight are counted.
    """
    proxy = S3Proxy(s3_server.endpoint)
    try:
        root = s3_server.url("run", query=f"endpoint={proxy.endpoint}")
        storage, base = resolve(root)
        manager = CheckpointManager(root, mode="sync", retention=RetentionPolicy(keep_last=None))
        manager.save(1, _state(1))
        other = CheckpointManager(root, mode="sync")
        proxy.faults = [Fault(lambda m, p: m == "PUT" and p.split("?")[0].endswith("/index.json"), 1, 0, 4.0)]
        saver = threading.Thread(target=manager.save, args=(2, _state(2)))
        saver.start()
        path = storage.join(base, "step-000000002")
        deadline = time.monotonic() + 60
        while not storage.exists(storage.join(path, "data-00000.safetensors")):
            assert time.monotonic() < deadline and saver.is_alive()
            time.sleep(0.01)
        with warnings.catch_warnings(record=True) as own:
            warnings.simplefilter("always")
            latest = manager.latest()
        with warnings.catch_warnings(record=True) as foreign:
            warnings.simplefilter("always")
            other.latest()
        assert not storage.exists(storage.join(path, "index.json"))  # still in flight
        saver.join(120)
        manager.close()
    finally:
        proxy.close()
    assert [str(w.message) for w in own if "step-000000002" in str(w.message)] == [] and latest.step == 1
    assert any("step-000000002" in str(w.message) and "never committed" in str(w.message) for w in foreign)
    assert manager.latest().step == 2


def test_leaked_multipart_uploads_under_committed_checkpoints_are_aborted(s3_server):
    root = s3_server.url("run")
    storage, base = resolve(root)
    CheckpointManager(root, mode="sync").save(1, _state(1))
    client = s3_server.client()
    committed_key = storage.join(base, "step-000000001", "data-00000.safetensors")
    uncommitted_key = storage.join(base, "step-000000009", "data-00000.safetensors")
    for key in (committed_key, uncommitted_key):  # as a crashed writer leaves them
        client.create_multipart_upload(Bucket=s3_server.bucket, Key=key)
    CheckpointManager(root, mode="sync")
    left = client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=base + "/").get("Uploads", [])
    # the uncommitted one may belong to a save still running elsewhere: left alone
    assert [u["Key"] for u in left] == [uncommitted_key]
    storage.abort_incomplete_uploads(base + "/")
