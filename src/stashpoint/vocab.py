"""The closed vocabularies of the public API, as ``Literal`` types, and their check.

Every option that takes one of a few words is typed here once, so that the
signature, the docs and the validation agree.  :func:`choose` is called at the
public boundary: a word outside the vocabulary raises
:class:`~stashpoint.errors.InvalidOptionError` naming the option and the words it
accepts, before any work or collective starts.  Torch-free, so the CLI can use it.
"""

from __future__ import annotations

from typing import Literal, TypeVar, get_args

from stashpoint.errors import InvalidOptionError

#: ``async_save``: return when the bytes are on the host, or at once
SaveMode = Literal["eager", "lazy"]
#: ``async_save`` with a save still persisting: wait for its buffer, or skip this save
IfBusy = Literal["wait", "skip"]
#: per-rank items read at another world size (``load``), or read whole (``iter_full``):
#: raise, leave out, take rank 0's value, or (``iter_full`` only) a list of all ranks'
PerRankChoice = Literal["error", "drop", "rank0", "all"]
#: how a leaf is shared among ranks (recorded in the save plan)
Scope = Literal["sharded", "replicated", "checked", "per_rank"]
#: how a layout renumbers a module's ``nn.ModuleList``: pipeline-stage layers, or experts
LayoutKind = Literal["stage", "experts"]

#: what a top-level entry of a state is: a module, an optimizer, anything else
EntryKind = Literal["module", "optimizer", "other"]
#: how an item is stored: once for the whole job, or once per rank
StoredScope = Literal["global", "per_rank"]
#: how a non-tensor value is stored: inline JSON, or bytes in a data file
Encoding = Literal["json", "pickle", "torch_pickle"]
#: what a checkpoint directory (or file) holds: ours, PyTorch DCP, HF safetensors, torch.save
CheckpointFormat = Literal["stashpoint", "dcp", "hf", "torch_save"]
#: what a merge produces
OutputFormat = Literal["stashpoint", "hf"]
#: keys missing from some merge inputs
MissingPolicy = Literal["error", "intersection", "union"]
#: what ``stashpoint.convert`` writes
ConvertTarget = Literal["stashpoint", "hf", "dcp"]
#: ``CheckpointManager``: an asynchronous save in one of ``async_save``'s modes, or a blocking one
ManagerMode = Literal["eager", "lazy", "sync"]
#: the signals a job can be told to stop with (preemption)
PreemptSignal = Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]
#: where the manager found a checkpoint: its memory tier, its root, or the upload tier
CheckpointTier = Literal["memory", "local", "remote"]
#: ``RetentionPolicy``: whether a lower or a higher metric is better
MetricGoal = Literal["min", "max"]

W = TypeVar("W", bound=str)


def words(vocabulary: object) -> tuple[str, ...]:
    """The words of a ``Literal`` vocabulary, in declaration order."""
    return tuple(get_args(vocabulary))


def choose(option: str, value: object, vocabulary: object, allowed: tuple[str, ...] | None = None) -> str:
    """``value`` if it is a word of ``vocabulary`` (narrowed to ``allowed``), else a named error.

    ``option`` is how the caller spelled the option (``"per_rank"``), so the message
    names it; the CLI maps options to its flags itself.
    """
    ok = allowed if allowed is not None else words(vocabulary)
    if not isinstance(value, str) or value not in ok:
        listed = ", ".join(repr(w) for w in ok)
        raise InvalidOptionError(f"{option} must be one of {listed}, not {value!r}")
    return value


#: how a merge method combines its inputs (see ``stashpoint.merging.registry``)
MergeKind = Literal["linear", "tensor", "search"]
#: dtypes a merge may compute in or write
MergeDtype = Literal["float32", "float16", "bfloat16", "float64"]
#: a base model also listed under ``models``: taken as the base only, or refused
BaseListed = Literal["dropped", "refused"]
#: how memory snapshots are protected against the loss of a node (``MemoryPolicy.protection``)
ProtectionKind = Literal["replicate", "parity"]
#: where a rank's part of a memory snapshot can be had after a node loss
HoldingKind = Literal["slot", "replica", "parity"]
#: how protection reaches other nodes' memory roots: by path (one machine, or a file system
#: every node mounts), over TCP between keepers, or decided from the ranks' host names
PeerTransport = Literal["auto", "files", "sockets"]
