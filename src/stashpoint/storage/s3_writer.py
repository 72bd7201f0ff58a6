"""Writing one S3 object: part buffers filled in order, uploaded by a bounded pool.

``write`` is sequential and copies into part-sized buffers; each full buffer is
uploaded as a multipart part by the writer's own small thread pool while the caller
keeps filling the next one.  At most ``concurrency`` parts are in flight, so a writer
holds at most ``(concurrency + 1) * part_size`` bytes (144 MiB with the defaults).
Objects smaller than one part go up in a single PUT.  A failed write aborts the
multipart upload, after in-flight parts have settled, so no parts are left behind.

The writer's buffering, threading and upload life cycle are a concern of their own,
apart from the storage class (``storage/s3.py``): it needs only the request layer
(:class:`~stashpoint.storage.s3_requests.S3Requests`) of the bucket it writes to.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from stashpoint.errors import StorageError
from stashpoint.storage import retry
from stashpoint.storage.base import ObjectWriter
from stashpoint.storage.s3_config import MAX_PARTS
from stashpoint.storage.s3_requests import S3Requests, code_status, count


class S3Writer(ObjectWriter):
    """Sequential writer: part buffers filled in order, uploaded by a bounded pool."""

    positional = False

    def __init__(self, requests: S3Requests, key: str, size: int | None) -> None:
        self._rq, self._key = requests, key
        opts = requests.options
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
            raise ValueError(f"{self._rq.describe(self._key)}: write after close or abort")
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
        client, bucket, key = self._rq.client, self._rq.bucket, self._key
        if self._upload_id is None:
            got = self._rq.call(
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
                f"{self._rq.where(key)}: more than {MAX_PARTS} parts; pass the size to open_writer "
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
            client, rq = self._rq.client, self._rq
            got = rq.call(
                "uploading part of",
                self._key,
                lambda: client.upload_part(
                    Bucket=rq.bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body
                ),
            )
            count(bytes_written=len(body))
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
        rq, key = self._rq, self._key
        body = bytes(self._buf[: self._fill])
        rq.call("writing", key, lambda: rq.client.put_object(Bucket=rq.bucket, Key=key, Body=body))
        count(bytes_written=len(body))

    def _complete(self) -> None:
        from botocore.exceptions import ClientError

        rq, key, client = self._rq, self._key, self._rq.client
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
                    Bucket=rq.bucket, Key=key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
                )
            except ClientError as exc:
                # a retry after a lost response: the first try may have completed it
                if tries > 1 and code_status(exc)[0] == "NoSuchUpload" and self._landed():
                    return
                raise

        rq.call("completing upload of", key, complete)

    def _landed(self) -> bool:
        """Whether the object is there with every byte written (what ``size`` would say)."""
        try:
            got = self._rq.head(self._key)
        except FileNotFoundError:
            return False
        return got is not None and int(got["ContentLength"]) == self._total

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
            rq, key = self._rq, self._key
            # a short budget: abort runs on the failure path, which should not hang
            policy = retry.RetryPolicy(max_attempts=5, deadline_s=min(30.0, rq.options.retry_deadline))
            try:
                rq.call(
                    "aborting upload of",
                    key,
                    lambda: rq.client.abort_multipart_upload(Bucket=rq.bucket, Key=key, UploadId=upload_id),
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
