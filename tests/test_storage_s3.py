"""The S3 backend against a real server (Ceph RGW): conformance, errors, uploads, reads."""

from __future__ import annotations

import tracemalloc
import warnings

import pytest
import torch

import stashpoint
from stashpoint.errors import (
    BucketNotFoundError,
    StorageAuthError,
    StoragePermissionError,
    UnsupportedStorageError,
)
from stashpoint.sizes import parse_size
from stashpoint.storage import Storage, resolve
from stashpoint.storage.s3 import STATS, S3Storage
from stashpoint.storage.s3_config import MiB, S3Options, parse_url
from stashpoint.storage.testing import StorageConformance
from test_storage import CheckpointsThroughBackend

SMALL_PARTS = S3Options(part_size=5 * MiB, concurrency=3)


class TestS3Storage(StorageConformance, CheckpointsThroughBackend):
    """Every conformance test, with 5 MiB parts so that the large cases are multipart."""

    @pytest.fixture
    def storage(self, s3_server) -> Storage:
        return S3Storage(s3_server.bucket, SMALL_PARTS)

    @pytest.fixture
    def root(self, s3_server) -> str:
        return resolve(s3_server.url())[1]

    @pytest.fixture
    def url(self, s3_server) -> str:
        return s3_server.url("ckpt")


# --- URLs and options (no server needed) ---------------------------------------------------


def test_url_forms_and_options():
    bucket, key, opts = parse_url("s3://bkt/a/b/?endpoint=http://h:1&part_size=8MiB&concurrency=3")
    assert (bucket, key) == ("bkt", "a/b")
    assert opts.endpoint == "http://h:1" and opts.part_size == 8 * MiB and opts.concurrency == 3
    assert parse_url("s3://bkt")[1] == "" and parse_size("1GiB") == 1 << 30
    with pytest.raises(ValueError, match="unknown s3 option 'colour'"):
        parse_url("s3://bkt/x?colour=red")
    with pytest.raises(ValueError, match="at least 5 MiB"):
        parse_url("s3://bkt/x?part_size=1MiB")
    with pytest.raises(ValueError, match="no bucket"):
        parse_url("s3:///x")


def test_url_round_trips_its_options(s3_server):
    storage, path = resolve(f"s3://{s3_server.bucket}/p/q?part_size=6MiB&read_timeout=5")
    assert isinstance(storage, S3Storage) and path == "p/q"
    again, same = resolve(storage.url(storage.join(path, "r")))
    assert same == "p/q/r" and again.options == storage.options


def test_import_stashpoint_does_not_import_boto3():
    import subprocess
    import sys

    code = "import sys, stashpoint; sys.exit(1 if 'boto3' in sys.modules or 'botocore' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_missing_boto3_is_a_named_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "stashpoint.storage.s3", None)  # as if boto3 were absent
    with pytest.raises(UnsupportedStorageError, match=r"stashpoint\[s3\]"):
        resolve("s3://bkt/x")


# --- named errors --------------------------------------------------------------------------


def test_wrong_secret_is_a_named_error(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageAuthError, match=rf"s3://{s3_server.bucket}/.*endpoint .*credentials"):
        stashpoint.save({"x": torch.ones(2)}, s3_server.url("ckpt"))
    with pytest.raises(StorageAuthError, match="SignatureDoesNotMatch"):
        stashpoint.load_full(s3_server.url("ckpt"))


def test_unknown_access_key_is_a_named_error(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageAuthError, match="InvalidAccessKeyId"):
        S3Storage(s3_server.bucket).list("")


def test_no_credentials_is_a_named_error(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageAuthError, match="no usable credentials"):
        S3Storage(s3_server.bucket).exists("x")


def test_missing_bucket_is_a_named_error(s3_server):
    url = "s3://no-such-bucket-stashpoint/ckpt"
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-stashpoint"):
        stashpoint.save({"x": torch.ones(2)}, url)
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-stashpoint"):
        stashpoint.load_full(url)


def test_permission_denied_is_a_named_error(s3_server, monkeypatch):
    if not s3_server.other_access_key:
        pytest.skip("the server has no second user")
    url = s3_server.url("ckpt")
    stashpoint.save({"x": torch.ones(2)}, url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.other_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.other_secret_key)
    with pytest.raises(StoragePermissionError, match="AccessDenied"):
        stashpoint.load_full(url)
    with pytest.raises(StoragePermissionError, match="access denied"):
        stashpoint.save({"x": torch.ones(2)}, s3_server.url("other"))
    storage, key = resolve(url)
    with pytest.raises(StoragePermissionError):
        storage.size(key + "/index.json")  # a HEAD: the code comes from a follow-up GET


def test_credentials_from_a_named_profile(s3_server, monkeypatch, tmp_path):
    creds = tmp_path / "credentials"
    key, secret = s3_server.access_key, s3_server.secret_key
    creds.write_text(f"[ckpt]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    url = s3_server.url("ckpt", query=f"profile=ckpt&endpoint={s3_server.endpoint}&region=us-east-1")
    stashpoint.save({"x": torch.arange(5)}, url)
    assert torch.equal(stashpoint.load_full(url)["x"], torch.arange(5))


# --- uploads: multipart, memory bound, abort -------------------------------------------------


def test_failed_multipart_write_leaves_no_parts(s3_server):
    storage = S3Storage(s3_server.bucket, SMALL_PARTS)
    key = resolve(s3_server.url("obj"))[1]
    w = storage.open_writer(key)
    w.write(b"x" * (12 * MiB))  # two parts sent, the rest buffered
    w.abort()
    assert not storage.exists(key)
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket, Prefix=key)
    assert uploads.get("Uploads", []) == []


def test_writer_memory_is_bounded_by_parts_in_flight(s3_server):
    opts = S3Options(part_size=5 * MiB, concurrency=2)
    storage = S3Storage(s3_server.bucket, opts)
    key = resolve(s3_server.url("bounded"))[1]
    piece = bytes(range(256)) * 4096  # 1 MiB
    total = 80 * MiB
    tracemalloc.start()
    try:
        with storage.open_writer(key) as w:
            for _ in range(total // len(piece)):
                w.write(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # (concurrency + 1) part buffers, plus slack for the client's own small allocations
    assert peak < (opts.concurrency + 1) * opts.part_size + 4 * MiB, peak / MiB
    assert storage.size(key) == total
    assert storage.read_range(key, total - 3, total) == piece[-3:]


def test_size_hint_keeps_part_count_within_limits(s3_server):
    storage = S3Storage(s3_server.bucket, SMALL_PARTS)
    w = storage.open_writer("never-written", size=200 << 30)  # 200 GiB: 5 MiB parts would be 40 960
    assert w._part_size * 10_000 >= 200 << 30
    w.abort()


# --- reads: ranged, parallel, only the bytes asked for -------------------------------------


def test_ranged_reads_fetch_only_the_bytes_asked_for(s3_server):
    storage = S3Storage(s3_server.bucket, SMALL_PARTS)
    key = resolve(s3_server.url("ranged"))[1]
    data = torch.randint(0, 256, (20 * MiB,), dtype=torch.uint8).numpy().tobytes()
    storage.write_bytes(key, data)
    before = dict(STATS)
    assert storage.read_range(key, 7 * MiB + 5, 7 * MiB + 105) == data[7 * MiB + 5 : 7 * MiB + 105]
    assert STATS["bytes_read"] - before["bytes_read"] == 100
    before = dict(STATS)
    buf = bytearray(17 * MiB)
    assert storage.read_into(key, MiB, memoryview(buf)) == 17 * MiB and buf == data[MiB : 18 * MiB]
    assert STATS["bytes_read"] - before["bytes_read"] == 17 * MiB
    assert STATS["get_requests"] - before["get_requests"] == 4  # 5 MiB GETs in parallel
    assert storage.read_into(key, 30 * MiB, memoryview(bytearray(10))) == 0  # past the end


def test_resharded_load_reads_only_needed_bytes(s3_server):
    url = s3_server.url("ckpt")
    b = torch.randn(1024)
    stashpoint.save({"w": torch.randn(1024, 1024), "b": b}, url)
    before = STATS["bytes_read"]
    got = stashpoint.load_full(url, ["b"])
    assert torch.equal(got["b"], b)
    fetched = STATS["bytes_read"] - before
    assert fetched < 64 << 10, fetched  # the index, a header, 4 KiB of data: not the 4 MiB weight


def test_list_pages_through_many_keys(s3_server):
    storage = S3Storage(s3_server.bucket)
    root = resolve(s3_server.url())[1]
    from concurrent.futures import ThreadPoolExecutor

    names = [f"k{i:04d}" for i in range(1100)]  # more than one 1000-key page
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: storage.write_bytes(storage.join(root, n), b""), names))
    assert storage.list(root) == names
    storage.delete(root)
    assert storage.list(root) == [] and not storage.exists(root)


def test_no_warnings_on_a_healthy_round_trip(s3_server):
    url = s3_server.url("ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stashpoint.save({"x": torch.randn(100)}, url)
        stashpoint.load_full(url)
