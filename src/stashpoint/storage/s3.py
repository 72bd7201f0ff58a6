"""Amazon S3 and S3-compatible stores (Ceph RGW, MinIO, ...) through boto3.

* Writes: one :class:`_S3Writer` per object.  ``write`` is sequential and copies into
  part-sized buffers; each full buffer is uploaded as a multipart part by the writer's
  own small thread pool while the caller keeps filling the next one.  At most
  ``concurrency`` parts are in flight, so a writer holds at most
  ``(concurrency + 1) * part_size`` bytes (144 MiB with the defaults).  Objects
  smaller than one part go up in a single PUT.  A failed write aborts the multipart
  upload, after in-flight parts have settled, so no parts are left behind.
  Positional writes are not offered: the engine then streams each file in order,
  which maps onto parts directly and keeps the memory bound simple.
* Reads: ranged GETs of exactly the bytes asked for; a long range is split into
  part-sized GETs that run in parallel straight into the caller's buffer.
* Every request is retried on throttling, 5xx, timeouts and dropped connections
  with jittered exponential backoff, bounded by attempts and a deadline
  (``storage/retry.py``); a body that breaks mid-stream resumes where it stopped.
* Failures become named errors (``stashpoint.errors``) that say bucket, key and
  endpoint, never raw botocore tracebacks.
* No atomic rename: checkpoints commit with :class:`~stashpoint.storage.commit.MarkerCommit`
  (the index is written last and is the marker).
"""

from __future__ import annotations

import posixpath
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from stashpoint.errors import (
    BucketNotFoundError,
    StorageAuthError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
)
from stashpoint.storage import retry
from stashpoint.storage.base import ObjectWriter, Storage
from stashpoint.storage.s3_config import MAX_PARTS, ClientEntry, S3Options, client_for, parse_url

T = TypeVar("T")

_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "UnrecognizedClientException",
}
_PERMISSION_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden"}
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "BadDigest",  # a body damaged in transit: sending it again is the fix
}

#: bytes counted by every ``S3Storage`` in this process (tests read it to check that a
#: resharded load fetched only the byte ranges it needed)
STATS = {"bytes_read": 0, "get_requests": 0, "bytes_written": 0}
_STATS_LOCK = threading.Lock()


def _count(**add: int) -> None:
    with _STATS_LOCK:
        for k, v in add.items():
            STATS[k] += v


def _code_status(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(exc: BaseException) -> bool:
    """Worth another try: throttling, 5xx, timeouts, connections refused or dropped."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
    )

    if isinstance(exc, ClientError):
        code, status = _code_status(exc)
        return status >= 500 or status == 429 or code in _RETRY_CODES
    # ConnectionError: refused/connect timeout; HTTPClientError: read timeouts, closed
    # connections, bodies broken mid-stream
    return isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError))


class S3Storage(Storage):
    """Objects in one bucket; backend paths are keys without a leading slash."""

    atomic_rename = False
    multipart_uploads = True  # a writer that dies mid-upload leaves its parts on the server

    def __init__(self, bucket: str, options: S3Options | None = None) -> None:
        self.bucket = bucket
        self.options = options or S3Options()
        self._entry: ClientEntry = client_for(self.options)
        self._bucket_checked = False

    # -- naming --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._entry.endpoint

    def describe(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"

    def url(self, path: str) -> str:
        query = self.options.query()
        return self.describe(path) + (f"?{query}" if query else "")

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts).lstrip("/")

    def _where(self, key: str | None) -> str:
        what = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        return f"{what} (endpoint {self.endpoint})"

    # -- requests ------------------------------------------------------------------------

    def _call(self, what: str, key: str | None, fn: Callable[[], T], policy=None) -> T:
        """``fn()`` with retries; failures become named errors (FileNotFoundError stays)."""

        def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
            if attempt == 3:  # once per call: a hint that something is struggling
                warnings.warn(
                    f"{what} {self._where(key)}: retrying after {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )

        try:
            return retry.call(fn, policy or self.options.retry, _is_transient, on_retry)
        except retry.RetriesExhausted as gave_up:
            raise StorageUnavailableError(
                f"{what} {self._where(key)} kept failing: {gave_up} "
                f"(limits: {self.options.max_attempts} attempts, {self.options.retry_deadline:g}s)"
            ) from gave_up.last
        except Exception as exc:
            raise self._translate(exc, what, key) from exc

    def _translate(self, exc: BaseException, what: str, key: str | None) -> BaseException:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(exc, (StorageError, FileNotFoundError)):
            return exc
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageAuthError(
                f"{what} {self._where(key)}: no usable credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the AWS config files"
            )
        if not isinstance(exc, ClientError):
            return StorageError(f"{what} {self._where(key)} failed: {type(exc).__name__}: {exc}")
        code, status = _code_status(exc)
        if code in _AUTH_CODES:
            return StorageAuthError(
                f"{what} {self._where(key)}: the store rejected the credentials ({code}); check the "
                "access key, secret and session token"
            )
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"{what} {self._where(key)}: bucket {self.bucket!r} does not exist")
        if code in _PERMISSION_CODES or status == 403:
            return StoragePermissionError(
                f"{what} {self._where(key)}: access denied ({code or status}); the credentials are not "
                "allowed to do this"
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return FileNotFoundError(f"{self.describe(key or '')} does not exist")
        return StorageError(f"{what} {self._where(key)} failed: {code or status}: {exc}")

    def _check_bucket(self) -> None:
        """After a 404 on a key: make sure it is the key, not the bucket, that is missing."""
        from botocore.exceptions import ClientError

        if self._bucket_checked:
            return

        def head_bucket() -> None:
            try:
                self._entry.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code_status(exc)[1] == 404:  # HEAD answers carry no error code
                    raise BucketNotFoundError(
                        f"bucket {self.bucket!r} does not exist (endpoint {self.endpoint})"
                    ) from None
                raise

        self._call("checking", None, head_bucket)
        self._bucket_checked = True

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        def head():
            try:
                return self._entry.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                code, status = _code_status(exc)
                if status == 404:
                    return None
                if status == 403:
                    # HEAD answers carry no error code: ask again with a GET, whose body
                    # says whether the key or the permission is at fault
                    self._entry.client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
                raise

        got = self._call("reading metadata of", key, head)
        if got is None:
            self._check_bucket()
        return got

    # -- Storage -------------------------------------------------------------------------

    def open_writer(self, path: str, size: int | None = None) -> ObjectWriter:
        return _S3Writer(self, path, size)

    def size(self, path: str) -> int:
        got = self._head(path)
        if got is None:
            raise FileNotFoundError(f"{self.describe(path)} does not exist")
        return int(got["ContentLength"])

    def exists(self, path: str) -> bool:
        if path and not path.endswith("/"):
            try:
                if self._head(path) is not None:
                    return True
            except FileNotFoundError:
                pass
        return self.is_prefix(path)

    def is_prefix(self, path: str) -> bool:
        prefix = _dir(path)
        got = self._call(
            "listing",
            prefix,
            lambda: self._entry.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1),
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
            page = self._call("listing", pre, lambda kw=kwargs: self._entry.client.list_objects_v2(**kw))
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
            page = self._call("listing", prefix, lambda kw=kwargs: self._entry.client.list_objects_v2(**kw))
            keys += [o["Key"] for o in page.get("Contents", ())]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return keys

    def delete(self, path: str) -> None:
        client = self._entry.client
        if path:  # deleting a key that does not exist succeeds in S3
            self._call("deleting", path, lambda: client.delete_object(Bucket=self.bucket, Key=path))
        keys = self._keys_under(_dir(path))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            got = self._call(
                "deleting under", path, lambda b=batch: client.delete_objects(Bucket=self.bucket, Delete=b)
            )
            errors = got.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"deleting {len(errors)} objects under {self._where(path)} failed, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message') or ''}".rstrip()
                )

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        view = memoryview(out).cast("B")
        n = len(view)
        step = self.options.part_size
        if n <= step:
            return self._get_range(path, offset, view)
        # a long range: part-sized GETs in parallel, each straight into its slice
        pool = self._entry.read_pool
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
                resp = self._entry.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + want - 1}"
                )
            except ClientError as exc:
                code, status = _code_status(exc)
                if code == "InvalidRange" or status == 416:
                    return done  # starts at or past the end: a short read
                if code == "NoSuchKey":
                    raise FileNotFoundError(f"{self.describe(key)} does not exist") from None
                raise
            body = resp["Body"]
            _count(get_requests=1)
            try:
                while done < len(view):
                    got = body.readinto(view[done:])
                    if not got:
                        break
                    done += got
            finally:
                body.close()
                _count(bytes_read=done - (start - offset))
            return done

        if not view:
            return 0
        return self._call("reading", key, attempt)

    def make_prefix(self, path: str) -> None:
        """Nothing to do: prefixes exist while objects under them do."""

    def sync_prefix(self, path: str) -> None:
        """Nothing to do: every completed PUT is durable and visible."""

    def abort_incomplete_uploads(self, prefix: str) -> int:
        """Abort multipart uploads left under ``prefix`` (e.g. by a writer that lost the
        store while aborting); returns how many.  A bucket lifecycle rule
        ``AbortIncompleteMultipartUpload`` is the server-side equivalent."""
        client = self._entry.client
        got = self._call(
            "listing uploads under",
            prefix,
            lambda: client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix),
        )
        uploads = got.get("Uploads", [])
        for up in uploads:
            self._call(
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


class _S3Writer(ObjectWriter):
    """Sequential writer: part buffers filled in order, uploaded by a bounded pool."""

    positional = False

    def __init__(self, storage: S3Storage, key: str, size: int | None) -> None:
        self._st, self._key = storage, key
        opts = storage.options
        self._part_size = opts.part_size
        if size:  # keep within S3's 10 000 parts
            self._part_size = max(self._part_size, -(-size // MAX_PARTS))
        self._concurrency = opts.concurrency
        self._buf = bytearray(self._part_size)
        self._fill = 0
        self._spare: list[bytearray] = []
        self._upload_id: str | None = None
        self._parts: list[tuple[int, Future]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(self._concurrency)
        self._spare_lock = threading.Lock()
        self._closed = False
        self._total = 0

    # the caller's thread --------------------------------------------------------------

    def write(self, data: memoryview | bytes) -> None:
        if self._closed:
            raise ValueError(f"{self._st.describe(self._key)}: write after close or abort")
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            self._total += n
            if self._fill == len(self._buf):
                self._send_part(last=False)

    def _send_part(self, last: bool) -> None:
        client, bucket, key = self._st._entry.client, self._st.bucket, self._key
        if self._upload_id is None:
            got = self._st._call(
                "starting upload of", key, lambda: client.create_multipart_upload(Bucket=bucket, Key=key)
            )
            self._upload_id = got["UploadId"]
            self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="stashpoint-s3-put")
        self._raise_failed()
        # the memory bound: wait for a free slot; a slot is held until its part is sent
        # (or has failed for good, which the retry deadline bounds)
        self._slots.acquire()
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            self._slots.release()
            raise StorageError(
                f"{self._st._where(key)}: more than {MAX_PARTS} parts; pass the size to open_writer "
                "or raise part_size"
            )
        buf, fill = self._buf, self._fill
        body = buf if fill == len(buf) else bytes(buf[:fill])
        try:
            fut = self._pool.submit(self._upload_part, number, body, buf)
        except BaseException:
            self._slots.release()
            raise
        self._parts.append((number, fut))
        if not last:
            with self._spare_lock:
                self._buf = self._spare.pop() if self._spare else bytearray(self._part_size)
            self._fill = 0

    def _raise_failed(self) -> None:
        """Stop early when a part already failed for good."""
        for _, fut in self._parts:
            if fut.done() and fut.exception() is not None:
                raise fut.exception()

    # pool threads ----------------------------------------------------------------------

    def _upload_part(self, number: int, body: bytes | bytearray, buf: bytearray) -> str:
        try:
            client, st = self._st._entry.client, self._st
            got = st._call(
                "uploading part of",
                self._key,
                lambda: client.upload_part(
                    Bucket=st.bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body
                ),
            )
            _count(bytes_written=len(body))
            return got["ETag"]
        finally:
            with self._spare_lock:
                if len(buf) == self._part_size and len(self._spare) < self._concurrency:
                    self._spare.append(buf)
            self._slots.release()

    # finishing -------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._upload_id is None:
                self._put_whole()
            else:
                if self._fill:
                    self._send_part(last=True)
                self._complete()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._release()

    def _put_whole(self) -> None:
        st, key = self._st, self._key
        body = bytes(self._buf[: self._fill])
        st._call("writing", key, lambda: st._entry.client.put_object(Bucket=st.bucket, Key=key, Body=body))
        _count(bytes_written=len(body))

    def _complete(self) -> None:
        from botocore.exceptions import ClientError

        st, key, client = self._st, self._key, self._st._entry.client
        # parts finish within the retry deadline, so this wait is bounded too
        wait([f for _, f in self._parts], return_when=FIRST_EXCEPTION)
        self._raise_failed()
        parts = [{"PartNumber": n, "ETag": f.result()} for n, f in self._parts]
        tries = 0

        def complete() -> None:
            nonlocal tries
            tries += 1
            try:
                client.complete_multipart_upload(
                    Bucket=st.bucket, Key=key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
                )
            except ClientError as exc:
                # a retry after a lost response: the first try may have completed it
                if tries > 1 and _code_status(exc)[0] == "NoSuchUpload" and self._landed():
                    return
                raise

        st._call("completing upload of", key, complete)

    def _landed(self) -> bool:
        try:
            return self._st.size(self._key) == self._total
        except FileNotFoundError:
            return False

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            for _, fut in self._parts:
                fut.cancel()
            # parts still being sent must settle first, or they could land after the
            # abort and linger as orphaned parts
            wait([f for _, f in self._parts])
            st, key = self._st, self._key
            # a short budget: abort runs on the failure path, which should not hang
            policy = retry.RetryPolicy(max_attempts=5, deadline_s=min(30.0, st.options.retry_deadline))
            try:
                st._call(
                    "aborting upload of",
                    key,
                    lambda: st._entry.client.abort_multipart_upload(
                        Bucket=st.bucket, Key=key, UploadId=upload_id
                    ),
                    policy=policy,
                )
            except FileNotFoundError:
                pass  # NoSuchUpload: already gone
            except StorageError as exc:
                warnings.warn(
                    f"{exc}; the upload's parts remain until S3Storage.abort_incomplete_uploads or a "
                    "bucket lifecycle rule removes them",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._release()

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._buf = bytearray()
        self._spare.clear()


def resolve_s3(url: str) -> tuple[Storage, str]:
    """The ``s3://`` factory for :func:`stashpoint.storage.resolve`."""
    bucket, key, options = parse_url(url)
    return S3Storage(bucket, options), key
