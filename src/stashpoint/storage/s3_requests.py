"""One S3 request: retried, counted, and failing with a named error.

:class:`S3Requests` is the layer between boto3 and the rest of the S3 backend: every
call to the store goes through :meth:`S3Requests.call`, which retries throttling,
5xx, timeouts and dropped connections with jittered exponential backoff, bounded by
attempts and a deadline (``storage/retry.py``), and turns every other failure into a
named error (``stashpoint.errors``) that says bucket, key and endpoint instead of a
raw botocore traceback.  It is its own module so that the storage class
(``storage/s3.py``) and the multipart writer (``storage/s3_writer.py``) share one
definition of what is transient and what each error code means.

:data:`STATS` counts the bytes and GETs of every S3 request in the process.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

from stashpoint.errors import (
    BucketNotFoundError,
    StorageAuthError,
    StorageError,
    StoragePermissionError,
    StorageUnavailableError,
)
from stashpoint.storage import retry
from stashpoint.storage.s3_config import ClientEntry, S3Options, client_for

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


def count(**add: int) -> None:
    """Add to :data:`STATS` (thread-safe)."""
    with _STATS_LOCK:
        for k, v in add.items():
            STATS[k] += v


def code_status(exc: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of a botocore error (``""`` and 0 when absent)."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Worth another try: throttling, 5xx, timeouts, connections refused or dropped."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
    )

    if isinstance(exc, ClientError):
        code, status = code_status(exc)
        return status >= 500 or status == 429 or code in _RETRY_CODES
    # ConnectionError: refused/connect timeout; HTTPClientError: read timeouts, closed
    # connections, bodies broken mid-stream
    return isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError))


class S3Requests:
    """Requests to one bucket through the process's cached client for ``options``."""

    def __init__(self, bucket: str, options: S3Options) -> None:
        self.bucket = bucket
        self.options = options
        self.entry: ClientEntry = client_for(options)
        self._bucket_checked = False

    @property
    def client(self):
        """The boto3 client (thread-safe)."""
        return self.entry.client

    @property
    def endpoint(self) -> str:
        return self.entry.endpoint

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def where(self, key: str | None) -> str:
        """The object (or the bucket) and the endpoint, for messages."""
        what = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        return f"{what} (endpoint {self.endpoint})"

    def call(self, what: str, key: str | None, fn: Callable[[], T], policy=None) -> T:
        """``fn()`` with retries; failures become named errors (FileNotFoundError stays)."""

        def on_retry(exc: BaseException, attempt: int, pause: float) -> None:
            if attempt == 3:  # once per call: a hint that something is struggling
                warnings.warn(
                    f"{what} {self.where(key)}: retrying after {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )

        try:
            return retry.call(fn, policy or self.options.retry, is_transient, on_retry)
        except retry.RetriesExhausted as gave_up:
            raise StorageUnavailableError(
                f"{what} {self.where(key)} kept failing: {gave_up} "
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
                f"{what} {self.where(key)}: no usable credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the AWS config files"
            )
        if not isinstance(exc, ClientError):
            return StorageError(f"{what} {self.where(key)} failed: {type(exc).__name__}: {exc}")
        code, status = code_status(exc)
        if code in _AUTH_CODES:
            return StorageAuthError(
                f"{what} {self.where(key)}: the store rejected the credentials ({code}); check the "
                "access key, secret and session token"
            )
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"{what} {self.where(key)}: bucket {self.bucket!r} does not exist")
        if code in _PERMISSION_CODES or status == 403:
            return StoragePermissionError(
                f"{what} {self.where(key)}: access denied ({code or status}); the credentials are not "
                "allowed to do this"
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return FileNotFoundError(f"{self.describe(key or '')} does not exist")
        return StorageError(f"{what} {self.where(key)} failed: {code or status}: {exc}")

    def check_bucket(self) -> None:
        """After a 404 on a key: make sure it is the key, not the bucket, that is missing."""
        from botocore.exceptions import ClientError

        if self._bucket_checked:
            return

        def head_bucket() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if code_status(exc)[1] == 404:  # HEAD answers carry no error code
                    raise BucketNotFoundError(
                        f"bucket {self.bucket!r} does not exist (endpoint {self.endpoint})"
                    ) from None
                raise

        self.call("checking", None, head_bucket)
        self._bucket_checked = True

    def head(self, key: str) -> dict | None:
        """The object's metadata; None when the key (not the bucket) is missing."""
        from botocore.exceptions import ClientError

        def head():
            try:
                return self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                code, status = code_status(exc)
                if status == 404:
                    return None
                if status == 403:
                    # HEAD answers carry no error code: ask again with a GET, whose body
                    # says whether the key or the permission is at fault
                    self.client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
                raise

        got = self.call("reading metadata of", key, head)
        if got is None:
            self.check_bucket()
        return got
