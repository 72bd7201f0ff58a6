"""Finding (or starting) the real S3 server for the tests: a Ceph RADOS Gateway.

``make test`` starts it with ``scripts/s3-server start`` before pytest and stops it
afterwards; the script writes a state file (``$STASHPOINT_S3_STATE``, default
``$TMPDIR/stashpoint-s3-server-<checkout hash>/state.json``) that :func:`find` reads.  Another S3
server can be used by setting ``STASHPOINT_TEST_S3_ENDPOINT``, ``..._ACCESS_KEY``,
``..._SECRET_KEY`` (and ``..._REGION``) instead; gateway-kill tests then skip.

Under plain ``pytest`` with no server up, the session fixture starts one itself when
Ceph is installed (and stops it at the end), unless ``STASHPOINT_TEST_S3=off``.
When none can be had, S3 tests are skipped with a loud warning, or fail when
``STASHPOINT_TEST_S3=require``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "s3-server")


def state_path() -> str:
    # one server per checkout, so two clones on one machine never share (or stop) each other's
    checkout = hashlib.sha1(ROOT.encode()).hexdigest()[:10]
    default = os.path.join(tempfile.gettempdir(), f"stashpoint-s3-server-{checkout}", "state.json")
    return os.environ.get("STASHPOINT_S3_STATE", default)


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    other_access_key: str | None = None
    other_secret_key: str | None = None
    pids: dict = field(default_factory=dict)
    managed: bool = False  # the script's state file exists: the gateway can be killed
    started_here: bool = False
    bucket: str = field(default_factory=lambda: f"stashpoint-tests-{uuid.uuid4().hex[:8]}")

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and stashpoint) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def url(self, name: str = "", query: str = "") -> str:
        """A fresh location in the session bucket."""
        u = f"s3://{self.bucket}/{uuid.uuid4().hex[:10]}/{name}".rstrip("/")
        return f"{u}?{query}" if query else u

    def client(
        self, access_key: str | None = None, secret_key: str | None = None, endpoint: str | None = None
    ):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
        )

    def kill_gateway(self) -> None:
        subprocess.run([SCRIPT, "kill-gateway"], check=True, timeout=60)

    def start_gateway(self) -> None:
        subprocess.run([SCRIPT, "start-gateway"], check=True, timeout=120)


def _from_state() -> S3Server | None:
    try:
        with open(state_path()) as f:
            s = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    if "access_key" not in s or not all(_alive(p) for p in s["pids"].values()):
        return None
    return S3Server(
        s["endpoint"],
        s["access_key"],
        s["secret_key"],
        s.get("region", "us-east-1"),
        s.get("other_access_key"),
        s.get("other_secret_key"),
        s["pids"],
        managed=True,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def find() -> S3Server | str:
    """The server to test against, or the reason there is none."""
    mode = os.environ.get("STASHPOINT_TEST_S3", "auto")
    if mode == "off":
        return "STASHPOINT_TEST_S3=off"
    server = _from_state()
    if server is not None:
        return server
    if os.environ.get("STASHPOINT_TEST_S3_ENDPOINT") and os.environ.get("STASHPOINT_TEST_S3_ACCESS_KEY"):
        return S3Server(
            os.environ["STASHPOINT_TEST_S3_ENDPOINT"],
            os.environ["STASHPOINT_TEST_S3_ACCESS_KEY"],
            os.environ.get("STASHPOINT_TEST_S3_SECRET_KEY", ""),
            os.environ.get("STASHPOINT_TEST_S3_REGION", "us-east-1"),
        )
    if not shutil.which("radosgw"):
        return (
            "no S3 server is running and Ceph is not installed (run `scripts/s3-server start` or `make test`)"
        )
    # plain pytest with Ceph installed: start one for this session (the script does
    # not install packages from here: only `make test` or `scripts/s3-server` do)
    got = subprocess.run([SCRIPT, "start"], capture_output=True, text=True, timeout=180)
    server = _from_state() if got.returncode == 0 else None
    if server is None:
        return f"starting the S3 server failed:\n{got.stderr[-3000:]}"
    server.started_here = True
    return server


def stop(server: S3Server) -> None:
    if server.started_here:
        subprocess.run([SCRIPT, "stop"], capture_output=True, timeout=120)


def skip_or_fail(reason: str):
    """Skip loudly (a warning as well as the skip reason), or fail when S3 is required."""
    import pytest

    message = f"S3 TESTS NOT RUN: {reason}"
    if os.environ.get("STASHPOINT_TEST_S3") == "require":
        pytest.fail(message)
    warnings.warn(message, UserWarning, stacklevel=2)
    pytest.skip(message)
