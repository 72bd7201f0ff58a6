"""Amazon S3 and S3-compatible stores (Ceph RGW, MinIO, ...) through boto3.

* Writes: one :class:`~stashpoint.storage.s3_writer.S3Writer` per object, which fills
  part-sized buffers in order and uploads them as multipart parts from a small pool
  while the caller fills the next one; a writer holds at most
  ``(concurrency + 1) * part_size`` bytes (144 MiB with the defaults), objects smaller
  than one part go up in a single PUT, and a failed write aborts its multipart upload
  (``storage/s3_writer.py``).  Positional writes are not offered: the engine then
  streams each file in order, which maps onto parts directly and keeps the memory
  bound simple.
* Reads: ranged GETs of exactly the bytes asked for; a long range is split into
  part-sized GETs that run in parallel straight into the caller's buffer.
* Every request is retried on throttling, 5xx, timeouts and dropped connections
  with jittered exponential backoff, bounded by attempts and a deadline
  (``storage/retry.py``); a body that breaks mid-stream resumes where it stopped.
* Failures become named errors (``stashpoint.errors``) that say bucket, key and
  endpoint, never raw botocore tracebacks (``storage/s3_requests.py``).
* No atomic rename: checkpoints commit with :class:`~stashpoint.storage.commit.MarkerCommit`
  (the index is written last and is the marker).

This module is the :class:`~stashpoint.storage.base.Storage` backend itself: naming,
listing, reading and deleting in terms of the request layer.  ``STATS`` is
re-exported from ``storage/s3_requests.py``.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import FIRST_EXCEPTION, wait

from stashpoint.errors import StorageError
from stashpoint.storage.base import ObjectWriter, Storage
from stashpoint.storage.s3_config import S3Options, parse_url
from stashpoint.storage.s3_requests import STATS, S3Requests, code_status, count
from stashpoint.storage.s3_writer import S3Writer

__all__ = ["STATS", "S3Storage", "resolve_s3"]


class S3Storage(Storage):
    """Objects in one bucket; backend paths are keys without a leading slash."""

    atomic_rename = False
    multipart_uploads = True  # a writer that dies mid-upload leaves its parts on the server

    def __init__(self, bucket: str, options: S3Options | None = None) -> None:
        self.bucket = bucket
        self.options = options or S3Options()
        self.requests = S3Requests(bucket, self.options)

    # -- naming --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.requests.endpoint

    def describe(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"

    def url(self, path: str) -> str:
        query = self.options.query()
        return self.describe(path) + (f"?{query}" if query else "")

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts).lstrip("/")

    # -- Storage -------------------------------------------------------------------------

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        return S3Writer(self.requests, path, size)

    def size(self, path: str) -> int:
        got = self.requests.head(path)
        if got is None:
            raise FileNotFoundError(f"{self.describe(path)} does not exist")
        return int(got["ContentLength"])

    def exists(self, path: str) -> bool:
        if path and not path.endswith("/"):
            try:
                if self.requests.head(path) is not None:
                    return True
            except FileNotFoundError:
                pass
        return self.is_prefix(path)

    def is_prefix(self, path: str) -> bool:
        prefix = _dir(path)
        got = self.requests.call(
            "listing",
            prefix,
            lambda: self.requests.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1),
        )
        return bool(got.get("KeyCount") or got.get("Contents"))

    def list(self, prefix: str) -> list[str]:
        pre = _dir(prefix)
        names: set[str] = set()
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": pre, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.requests.call(
                "listing", pre, lambda kw=kwargs: self.requests.client.list_objects_v2(**kw)
            )
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(pre) :]
                if name:  # skip a zero-byte "directory" marker object named after the prefix
                    names.add(name)
            for sub in page.get("CommonPrefixes", ()):
                name = sub["Prefix"][len(pre) :].rstrip("/")
                if name:
                    names.add(name)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(names)

    def _keys_under(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.requests.call(
                "listing", prefix, lambda kw=kwargs: self.requests.client.list_objects_v2(**kw)
            )
            keys += [o["Key"] for o in page.get("Contents", ())]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return keys

    def delete(self, path: str) -> None:
        client = self.requests.client
        if path:  # deleting a key that does not exist succeeds in S3
            self.requests.call("deleting", path, lambda: client.delete_object(Bucket=self.bucket, Key=path))
        keys = self._keys_under(_dir(path))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            got = self.requests.call(
                "deleting under", path, lambda b=batch: client.delete_objects(Bucket=self.bucket, Delete=b)
            )
            errors = got.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"deleting {len(errors)} objects under {self.requests.where(path)} failed, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message') or ''}".rstrip()
                )

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        view = memoryview(out).cast("B")
        n = len(view)
        step = self.options.part_size
        if n <= step:
            return self._get_range(path, offset, view)
        # a long range: part-sized GETs in parallel, each straight into its slice
        pool = self.requests.entry.read_pool
        futures = [
            pool.submit(self._get_range, path, offset + lo, view[lo : lo + step]) for lo in range(0, n, step)
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                for g in futures:
                    g.cancel()
                wait(futures)
                raise f.exception()
        total = 0
        for lo, f in zip(range(0, n, step), futures):
            got = f.result()
            total += got
            if got < min(step, n - lo):  # the object ended inside this slice
                break
        return total

    def _get_range(self, key: str, offset: int, view: memoryview) -> int:
        """GET ``[offset, offset + len(view))``; resumes where a broken body stopped."""
        from botocore.exceptions import ClientError

        done = 0

        def attempt() -> int:
            nonlocal done
            start = offset + done
            want = len(view) - done
            try:
                resp = self.requests.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + want - 1}"
                )
            except ClientError as exc:
                code, status = code_status(exc)
                if code == "InvalidRange" or status == 416:
                    return done  # starts at or past the end: a short read
                if code == "NoSuchKey":
                    raise FileNotFoundError(f"{self.describe(key)} does not exist") from None
                raise
            body = resp["Body"]
            count(get_requests=1)
            try:
                while done < len(view):
                    got = body.readinto(view[done:])
                    if not got:
                        break
                    done += got
            finally:
                body.close()
                count(bytes_read=done - (start - offset))
            return done

        if not view:
            return 0
        return self.requests.call("reading", key, attempt)

    def make_prefix(self, path: str) -> None:
        """Nothing to do: prefixes exist while objects under them do."""

    def sync_prefix(self, path: str) -> None:
        """Nothing to do: every completed PUT is durable and visible."""

    def abort_incomplete_uploads(self, prefix: str) -> int:
        """Abort multipart uploads left under ``prefix`` (e.g. by a writer that lost the
        store while aborting); returns how many.  A bucket lifecycle rule
        ``AbortIncompleteMultipartUpload`` is the server-side equivalent."""
        client = self.requests.client
        got = self.requests.call(
            "listing uploads under",
            prefix,
            lambda: client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix),
        )
        uploads = got.get("Uploads", [])
        for up in uploads:
            self.requests.call(
                "aborting upload of",
                up["Key"],
                lambda u=up: client.abort_multipart_upload(
                    Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]
                ),
            )
        return len(uploads)


def _dir(path: str) -> str:
    """The listing prefix of a "directory": ``a/b`` -> ``a/b/``; the bucket root -> ``""``."""
    path = path.strip("/")
    return path + "/" if path else ""


def resolve_s3(url: str) -> tuple[Storage, str]:
    """The ``s3://`` factory for :func:`stashpoint.storage.resolve`."""
    bucket, key, options = parse_url(url)
    return S3Storage(bucket, options), key
