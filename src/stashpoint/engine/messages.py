"""The protocol between a trainer and its background writer process, as typed messages.

Every message is a frozen dataclass sent whole over a pipe (``Connection.send``).
Trainer -> writer: :class:`Alloc`, :class:`Free`, :class:`Submit`, :class:`Shutdown`.
Writer -> trainer: :class:`Allocated` or :class:`AllocFailed` for an ``Alloc``;
:class:`Persisted` then :class:`Committed`, or :class:`Failed`, for a ``Submit``.

A writer that keeps a memory tier (a *keeper*, :mod:`~stashpoint.engine.keeper`) also
takes :class:`SlotAlloc` (answered like ``Alloc``), :class:`Seal` and
:class:`PersistSnapshot` (answered like ``Submit``), :class:`Preempted` and
:class:`Release`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from stashpoint import errors
from stashpoint.engine.records import Chunk, Inline
from stashpoint.format.grid import TensorGrid
from stashpoint.format.index import SaveMetadata
from stashpoint.planning.save_plan import ItemPlan
from stashpoint.storage.commit import CommitStrategy

#: environment variables that choose where and how storage is reached
_STORAGE_ENV_PREFIXES = ("AWS_", "STASHPOINT_")


def storage_env() -> tuple[tuple[str, str], ...]:
    """The caller's storage settings, sent with every job.

    The writer process outlives the settings it started with: a trainer (or a test)
    may set credentials or endpoints later, and each save must use the ones in force
    when it was requested.
    """
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_STORAGE_ENV_PREFIXES)))


def apply_env(env: tuple[tuple[str, str], ...]) -> None:
    """In the writer: make ``env`` (from :func:`storage_env`) the storage settings in force."""
    wanted = dict(env)
    for key in [k for k in os.environ if k.startswith(_STORAGE_ENV_PREFIXES) and k not in wanted]:
        del os.environ[key]
    os.environ.update(wanted)


@dataclass(frozen=True)
class Job:
    """One rank's share of an async save: its staged chunks and how to publish them.

    The chunks lie in the staging buffer ``buffer_tag`` one after the other, each at
    an aligned offset (:func:`stashpoint.engine.staging.pack`).  ``token`` is the save
    id all ranks agreed on; it names the staging location.
    """

    job_id: int
    token: str
    rank: int
    world_size: int
    path: str  # the checkpoint URL or path, resolved again in the writer
    buffer_tag: str
    chunks: tuple[Chunk, ...]
    inline: tuple[Inline, ...]
    crc_block: int
    timeout_s: float
    overwrite: bool
    commit: CommitStrategy
    #: the tensors whose chunks go into index fragments (every rank), see plan_grids
    grids: dict[str, TensorGrid] = field(default_factory=dict)
    #: rank 0 only: what the index is built from
    plan_items: dict[str, ItemPlan] | None = None
    metadata: SaveMetadata | None = None
    submitted_unix: float = field(default_factory=time.time)
    env: tuple[tuple[str, str], ...] = field(default_factory=storage_env)


@dataclass(frozen=True)
class ErrorReport:
    """An exception raised in the writer, as it crosses the pipe."""

    name: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> ErrorReport:
        return cls(name=type(exc).__name__, message=str(exc))

    def rebuild(self) -> BaseException:
        """The same stashpoint error class in the trainer; anything else as a WriterError."""
        cls = getattr(errors, self.name, None)
        if isinstance(cls, type) and issubclass(cls, errors.StashpointError):
            return cls(self.message)
        return errors.WriterError(f"{self.name}: {self.message}")


@dataclass(frozen=True)
class Outcome:
    """What the writer did for a committed job (this rank's share)."""

    bytes_written: int
    total_bytes: int | None  # rank 0 only: the whole checkpoint
    phase_seconds: dict[str, float]


# trainer -> writer


@dataclass(frozen=True)
class Alloc:
    tag: str
    size: int


@dataclass(frozen=True)
class Free:
    tag: str


@dataclass(frozen=True)
class Submit:
    job: Job


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class SlotAlloc:
    """A snapshot slot of exactly ``size`` bytes (kept if it already has that size)."""

    slot: int
    size: int


@dataclass(frozen=True, kw_only=True)
class Seal:
    """The trainer finished copying a snapshot of ``step`` into ``slot``: checksum it and
    write its manifest.  ``ranges[i]`` is where ``chunks[i]`` lies in the slot file."""

    job_id: int
    slot: int
    step: int
    save_id: str
    rank: int
    world_size: int
    crc_block: int
    file_size: int
    chunks: tuple[Chunk, ...]
    ranges: tuple[tuple[int, int], ...]
    inline: tuple[Inline, ...]
    #: rank 0 only: what the index is built from
    plan_items: dict[str, ItemPlan] | None = None
    metadata: SaveMetadata | None = None


@dataclass(frozen=True, kw_only=True)
class PersistSnapshot:
    """Write the snapshot held by ``slot`` as a durable checkpoint at ``path``."""

    job_id: int
    slot: int
    path: str
    timeout_s: float
    env: tuple[tuple[str, str], ...] = field(default_factory=storage_env)


@dataclass(frozen=True)
class Preempted:
    """The job was told to stop: persist on your own if nothing is asked by ``deadline_unix``."""

    deadline_unix: float


@dataclass(frozen=True)
class Release:
    """Training is over: free the memory tier and exit once the queued work is done."""


#: the tag of :class:`ServeNode`'s answer
NODE_SERVER_TAG = "node-server"


@dataclass(frozen=True, kw_only=True)
class ServeNode:
    """Serve this node's memory root to the job's other nodes on ``host``, to peers holding
    ``token`` (:mod:`~stashpoint.engine.node_server`); answered with :class:`Allocated`
    (tag :data:`NODE_SERVER_TAG`, ``path`` the address, ``host:port``) or
    :class:`AllocFailed`.  Asked again with the same host and token, the same server answers."""

    host: str
    token: str


# writer -> trainer


@dataclass(frozen=True)
class Allocated:
    """What the writer made for ``tag``, and where: a buffer's path, or a server's address."""

    tag: str
    path: str


@dataclass(frozen=True)
class AllocFailed:
    tag: str
    error: ErrorReport


@dataclass(frozen=True)
class Persisted:
    job_id: int
    bytes_written: int


@dataclass(frozen=True)
class Committed:
    job_id: int
    outcome: Outcome


@dataclass(frozen=True)
class Failed:
    job_id: int
    error: ErrorReport


ToWriter = (
    Alloc | Free | Submit | Shutdown | SlotAlloc | Seal | PersistSnapshot | Preempted | Release | ServeNode
)
FromWriter = Allocated | AllocFailed | Persisted | Committed | Failed
