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


class CheckpointExistsError(StashpointError, FileExistsError):
    """A save would replace an existing checkpoint and ``overwrite`` was not given."""


class IndexCorruptError(StashpointError):
    """The JSON index cannot be parsed or does not follow the format."""


class UnsupportedFormatVersionError(StashpointError):
    """The index was written by a format version this release cannot read."""


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


class WorldSizeMismatchError(StateMismatchError):
    """A per-rank item was saved at another world size and no policy says what to do."""


class LoadApplyError(StashpointError):
    """A module, optimizer or stateful object refused the loaded values (after validation)."""


class PickleNotAllowedError(StashpointError):
    """An item is stored as pickle and the caller did not pass ``allow_pickle=True``."""


# --- the state given to save --------------------------------------------------------------


class InvalidStateError(StashpointError, TypeError):
    """The state handed to save or load cannot be checkpointed as it is."""


class InconsistentStateError(StashpointError):
    """Ranks disagree about a tensor (dtype, global shape) or shards do not tile it."""


# --- coordination ---------------------------------------------------------------------------


class CoordinationError(StashpointError):
    """A collective among ranks failed or timed out (a peer died or hung)."""


class WriterError(StashpointError):
    """The background writer process failed or is gone."""


class StagingMemoryError(StashpointError, MemoryError):
    """Host staging memory for an asynchronous save cannot be reserved."""


class StorageWriteError(StashpointError, OSError):
    """Storage refused a write (disk full, permission, I/O error)."""


class RemoteRankError(StashpointError):
    """Another rank failed; this rank stops too so that all ranks agree."""
