"""Every error stashpoint raises on purpose.

All of them derive from :class:`StashpointError`, so ``except StashpointError``
catches anything the library reports about bad input, bad data or a failed
collective.  Messages always name the checkpoint path and, where there is one,
the key that is at fault.
"""

from __future__ import annotations


class StashpointError(Exception):
    """Base class of every error raised by stashpoint."""


# --- finding and opening a checkpoint ------------------------------------------------


class CheckpointNotFoundError(StashpointError, FileNotFoundError):
    """Nothing exists at the given path."""


class IncompleteCheckpointError(StashpointError):
    """Something exists at the path but was never committed (no index)."""


class NotACheckpointError(IncompleteCheckpointError):
    """A directory exists at the path but holds no checkpoint of any supported format, nor
    the remains of an interrupted save (data files without an index, a ``.NAME.partial-*``
    sibling)."""


class CheckpointExistsError(StashpointError, FileExistsError):
    """A save would replace an existing checkpoint and ``overwrite`` was not given."""


class IndexCorruptError(StashpointError):
    """The JSON index cannot be parsed or does not follow the format."""


class UnsafePathError(IndexCorruptError):
    """A checkpoint names a file outside itself (an absolute path, ``..``, a link out of it),
    or a file it needs is not a regular file (a FIFO, device, socket or directory)."""


class UnsupportedFormatVersionError(StashpointError):
    """The index was written by a format version this release cannot read."""


class InvalidOptionError(StashpointError, ValueError):
    """An option has a value outside what it accepts (a word, a size, a range)."""


class UnsupportedStorageError(StashpointError, ValueError):
    """No storage backend handles the given URL scheme."""


# --- data files ------------------------------------------------------------------------


class DataFileMissingError(StashpointError, FileNotFoundError):
    """A data file named by the index does not exist."""


class TruncatedDataError(StashpointError):
    """A data file is shorter than the byte ranges the index records for it."""


class ChecksumMismatchError(StashpointError):
    """Bytes read back do not match the crc32c recorded at save time."""


# --- matching a checkpoint against the target state -------------------------------------


class StateMismatchError(StashpointError):
    """Base class of the errors that compare the checkpoint with the target state."""


class MissingKeyError(StateMismatchError, KeyError):
    """The target state has a key that the checkpoint does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnexpectedKeyError(StateMismatchError, KeyError):
    """The checkpoint holds a key that the target state does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(StateMismatchError):
    """A tensor's global shape differs between checkpoint and target."""


class DtypeMismatchError(StateMismatchError):
    """A tensor's dtype differs between checkpoint and target."""


class TypeMismatchError(StateMismatchError):
    """The checkpoint holds a tensor where the target holds a plain value, or vice versa."""


class TensorSubclassMismatchError(TypeMismatchError):
    """A tensor subclass (a Float8-style wrapper) was saved with another class or flatten
    context than the target's, or one side holds the subclass and the other a plain tensor."""


class WorldSizeMismatchError(StateMismatchError):
    """A per-rank item was saved at another world size and no policy says what to do."""


class LoadApplyError(StashpointError):
    """A module, optimizer or stateful object refused the loaded values (after validation)."""


class PickleNotAllowedError(StashpointError):
    """An item is stored as pickle and the caller did not pass ``allow_pickle=True``."""


# --- the state given to save --------------------------------------------------------------


class InvalidStateError(StashpointError, TypeError):
    """The state handed to save or load cannot be checkpointed as it is."""


class StageRecoveryError(StashpointError):
    """A lost pipeline stage cannot be rebuilt from its neighbours (none given, or their
    layers differ from the stage's); nothing was changed."""


class UnsupportedTensorError(InvalidStateError):
    """A tensor stashpoint cannot save whole: a subclass without ``__tensor_flatten__``, a
    DTensor whose local shard is itself a subclass, or a flatten context with values that
    cannot be recorded.  Raised instead of saving only part of its state."""


class InconsistentStateError(StashpointError):
    """Ranks disagree about a tensor (dtype, global shape) or shards do not tile it."""


class NameCollisionError(InconsistentStateError):
    """Two ranks hold the same name, overlapping, with different bytes (docs/LAYOUTS.md).

    Typically pipeline stages or expert shards that number their layers from 0 on
    every rank: wrap the module in ``stashpoint.WithLayout`` with its layout.
    """


# --- coordination ---------------------------------------------------------------------------


class CoordinationError(StashpointError):
    """A collective among ranks failed or timed out (a peer died or hung)."""


class WriterError(StashpointError):
    """The background writer process failed or is gone."""


class StagingMemoryError(StashpointError, MemoryError):
    """Host staging memory for an asynchronous save cannot be reserved."""


class StorageWriteError(StashpointError, OSError):
    """Storage refused a write (disk full, permission, I/O error)."""


class DiskFullError(StorageWriteError):
    """A write failed because the device or the user's quota is out of space or inodes
    (``ENOSPC`` / ``EDQUOT``); ``errno`` is the one the filesystem gave."""


class RemoteRankError(StashpointError):
    """Another rank failed; this rank stops too so that all ranks agree."""


# --- merging checkpoints ----------------------------------------------------------------------


class MergeError(StashpointError):
    """Base class of the errors :func:`stashpoint.merge` raises about its inputs or settings."""


class MergeConfigError(MergeError, ValueError):
    """The merge configuration is invalid: unknown method, key or parameter, bad value."""


class MergeInputError(MergeError):
    """A merge input cannot be opened, or lacks what the method needs (metadata, moments)."""


class MissingTensorError(MergeError, KeyError):
    """A tensor is held by some merge inputs and not by others (``missing: error``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MergeShapeError(MergeError):
    """A tensor has different shapes in different merge inputs."""


class MergeDtypeError(MergeError):
    """A tensor has different floating dtypes in different inputs and no compute dtype is set."""


class MergeWeightsError(MergeError, ValueError):
    """Merge weights cannot be used: they sum to zero under normalisation, or do not fit."""


class EvaluationError(MergeError):
    """A soup or LCSC evaluation (callable or command) failed or did not return a number."""


# --- remote storage (object stores) ------------------------------------------------------


class StorageError(StashpointError):
    """A storage backend failed for a reason other than a missing object.

    Messages name the backend location (e.g. ``s3://bucket/key``) and, for remote
    stores, the endpoint.  Not an ``OSError`` on purpose: these must reach the caller
    as they are, not be mistaken for local disk trouble.
    """


class StorageAuthError(StorageError):
    """The store rejected the credentials (unknown key, bad secret, expired token, none found)."""


class StoragePermissionError(StorageError):
    """The credentials are valid but not allowed to do this (access denied)."""


class BucketNotFoundError(StorageError):
    """The bucket (or container) named in the URL does not exist."""


class StorageUnavailableError(StorageError):
    """The store kept failing (timeouts, throttling, 5xx) until the retry budget ran out."""


class NotAFileError(UnsafePathError, StorageError):
    """A path where a file is expected is something else: a directory, a FIFO, a socket,
    a device.  Raised before anything could block on it or read from it; as a checkpoint
    that names such a file is unsafe to read, it is also an :class:`UnsafePathError`."""


# --- tiered checkpoints ----------------------------------------------------------------------


class UploadError(StashpointError):
    """Copying a checkpoint to the remote tier failed.

    Neither tier is damaged: the local copy stays, and the remote one was never
    committed (its index is written last, through the remote commit strategy).
    """


# --- peer-to-peer recovery (torchft) -----------------------------------------------------------


class PeerTransferError(StashpointError):
    """A checkpoint could not be fetched from a healthy peer (refused, not served, malformed).

    The message names the peer's address, the step and the file or key concerned.  The
    receiver's state is untouched: nothing is returned until every byte is verified.
    """


class PeerTimeoutError(PeerTransferError, TimeoutError):
    """A wait for a peer (its server, the step it serves, a range of bytes) ran out of time."""


# --- node loss: memory snapshots protected across nodes -----------------------------------------


class ProtectionError(StashpointError):
    """Protecting a memory snapshot on peer nodes, or rebuilding a lost rank's part, failed.

    Raised when a peer node's memory root cannot be reached or written, or its lock is
    not taken in time; the message names the memory root, the file and the step.  A
    damaged replica or parity block is a :class:`ChecksumMismatchError` instead.  The
    snapshot itself stays usable on its own node; it is only not protected.
    """


class PeerConnectionError(ProtectionError, ConnectionError):
    """A peer node's keeper could not be reached over the network, closed the connection,
    broke the protocol, refused this job's token, or did not answer in time; the message
    names the node, its address and the file."""


class UnprotectedWarning(UserWarning):
    """The job's memory snapshots cannot be protected as its policy asks (too few nodes for
    the copies or the parity group, or node memory roots the transport cannot reach)."""


class ProtectionExceededWarning(UserWarning):
    """Nodes were lost beyond what the protection covers (two nodes of one parity group, every
    node holding a replica): no memory snapshot is restored, the durable tier is used."""
