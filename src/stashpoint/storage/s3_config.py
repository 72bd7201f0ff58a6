"""How an ``s3://`` URL becomes a configured boto3 client.

URL form: ``s3://bucket/prefix[?option=value&...]``.  Options in the query string are
the explicit settings; everything not given there comes from the standard AWS chain
that boto3 implements (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``~/.aws/config`` and
``~/.aws/credentials``, instance roles).  Secrets never go in the URL: the URL is
shown in messages and passed between processes.

Query options (all optional):

``endpoint``         S3 endpoint URL, e.g. ``http://127.0.0.1:7480`` (Ceph, MinIO)
``region``           signing region (default: the AWS chain, else ``us-east-1``)
``profile``          a named profile from the AWS config files
``addressing``       ``path`` (default when an endpoint is given) or ``virtual``
``part_size``        multipart part and ranged-GET size, e.g. ``16MiB`` (min 5 MiB)
``concurrency``      parts in flight per writer and ranged GETs per read (default 8)
``max_attempts``     tries per request, the first included (default 10)
``retry_deadline``   seconds after which a failing request is not retried (default 120)
``connect_timeout``  seconds to open a connection (default 10)
``read_timeout``     seconds to wait for response bytes (default 60)
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from urllib.parse import parse_qsl, unquote, urlencode

from stashpoint.sizes import parse_size
from stashpoint.storage.retry import RetryPolicy

MiB = 1 << 20
#: S3's own limits: parts other than the last are at least 5 MiB, at most 10 000 parts
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing: str | None = None
    part_size: int = 16 * MiB
    concurrency: int = 8
    max_attempts: int = 10
    retry_deadline: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least 5 MiB (S3's minimum), got {self.part_size}")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be at least 1")
        if self.addressing not in (None, "path", "virtual"):
            raise ValueError(f"addressing must be 'path' or 'virtual', got {self.addressing!r}")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.max_attempts, deadline_s=self.retry_deadline)

    def query(self) -> str:
        """The options that differ from the defaults, as a URL query string."""
        default = S3Options()
        items = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                items.append((f.name, str(value)))
        return urlencode(items)


def parse_url(url: str) -> tuple[str, str, S3Options]:
    """``s3://bucket/some/prefix?opt=v`` -> ("bucket", "some/prefix", options)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest, _, query = url[len("s3://") :].partition("?")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
    kinds = {f.name: f.type for f in fields(S3Options)}
    values: dict[str, object] = {}
    for name, value in parse_qsl(query, keep_blank_values=False, strict_parsing=False):
        if name not in kinds:
            raise ValueError(f"unknown s3 option {name!r} in {url!r}; known: {', '.join(sorted(kinds))}")
        if name == "part_size":
            values[name] = parse_size(value, "part_size")
        elif name in ("concurrency", "max_attempts"):
            values[name] = int(value)
        elif name in ("retry_deadline", "connect_timeout", "read_timeout"):
            values[name] = float(value)
        else:
            values[name] = value
    return bucket, unquote(key).strip("/"), replace(S3Options(), **values)


class ClientEntry:
    """A boto3 client (thread-safe) and the pool that runs ranged GETs, shared per process."""

    def __init__(self, client, endpoint: str, region: str, concurrency: int) -> None:
        self.client = client
        self.endpoint = endpoint
        self.region = region
        self._concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def read_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="stashpoint-s3-get")
            return self._pool


_CLIENTS: dict[tuple, ClientEntry] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(opts: S3Options) -> ClientEntry:
    """The cached client for these options and the current AWS environment.

    Building a client loads botocore's service model (tens of milliseconds), so one is
    kept per process, keyed by the options, the ``AWS_*`` variables (a changed
    credential variable gives a new client) and the process id (no sharing across fork).
    """
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (opts, env, os.getpid())
    with _CLIENTS_LOCK:  # boto3 sessions are not thread-safe; creating clients is serialised
        entry = _CLIENTS.get(key)
        if entry is None:
            entry = _CLIENTS[key] = _make_client(opts)
        return entry


def _make_client(opts: S3Options) -> ClientEntry:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=opts.profile) if opts.profile else boto3.session.Session()
    region = opts.region or session.region_name or "us-east-1"
    addressing = opts.addressing or ("path" if opts.endpoint else "auto")
    extra = {}
    if "request_checksum_calculation" in Config.OPTION_DEFAULTS:  # botocore >= 1.36
        # newer botocore adds CRC trailers by default, which older S3-compatible
        # servers (Ceph 16, older MinIO) reject; the engine checksums the data itself
        extra = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
    config = Config(
        region_name=region,
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        # our own retry loop (storage/retry.py) has a deadline and also covers bodies
        # that break mid-stream; botocore's would multiply with it
        retries={"total_max_attempts": 1, "mode": "standard"},
        # parts in flight per writer plus ranged GETs, with room for small requests
        max_pool_connections=2 * opts.concurrency + 8,
        s3={"addressing_style": addressing},
        user_agent_extra="stashpoint",
        **extra,
    )
    client = session.client("s3", endpoint_url=opts.endpoint, config=config)
    return ClientEntry(client, client.meta.endpoint_url, region, opts.concurrency)
