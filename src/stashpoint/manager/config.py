"""What a :class:`~stashpoint.manager.CheckpointManager` is set up with, as one validated object.

:class:`ManagerConfig` groups the manager's options: when to save
(:class:`SavePolicy`), what to keep (:class:`RetentionPolicy`), how to save
(``mode``, ``if_busy``, ``device_buffer``), how long collectives may wait, where
telemetry goes, when leftovers of crashed runs count as stale, and the remote tier
(:class:`UploadPolicy`).  The manager also accepts these fields as keyword
arguments; :func:`manager_config` turns them into a config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from stashpoint.errors import InvalidOptionError
from stashpoint.manager.memory import MemoryPolicy
from stashpoint.manager.policy import RetentionPolicy, SavePolicy, check_positive
from stashpoint.manager.tiering import UploadPolicy
from stashpoint.vocab import IfBusy, ManagerMode, choose


@dataclass(frozen=True, kw_only=True)
class ManagerConfig:
    """Every option of a :class:`~stashpoint.manager.CheckpointManager`.

    ``mode``: ``"lazy"`` or ``"eager"`` (asynchronous saves, see
    :func:`stashpoint.async_save`) or ``"sync"``.  ``if_busy`` and ``device_buffer``
    are passed to :func:`stashpoint.async_save`.  ``timeout_s`` bounds every
    collective and wait.  ``telemetry_path``: where save and load records are appended
    (default ``ROOT/telemetry.jsonl`` for a local root, none otherwise).
    ``stale_after_s``: age after which a partial save found at start belongs to a
    crashed run and is removed (default ``timeout_s``).  ``upload``: the remote tier.
    ``memory``: the memory tier (snapshots every k steps held by a keeper process;
    durable saves are then written from the newest snapshot).
    """

    save_policy: SavePolicy = field(default_factory=lambda: SavePolicy(every_steps=1000))
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    mode: ManagerMode = "lazy"
    if_busy: IfBusy = "wait"
    device_buffer: bool = False
    timeout_s: float = 600.0
    telemetry_path: str | None = None
    stale_after_s: float | None = None
    upload: UploadPolicy | None = None
    memory: MemoryPolicy | None = None

    def __post_init__(self) -> None:
        _check_type("save_policy", self.save_policy, SavePolicy)
        _check_type("retention", self.retention, RetentionPolicy)
        choose("mode", self.mode, ManagerMode)
        choose("if_busy", self.if_busy, IfBusy)
        _check_type("device_buffer", self.device_buffer, bool)
        check_positive("timeout_s", self.timeout_s, or_none=False)
        if self.stale_after_s is not None and (
            isinstance(self.stale_after_s, bool)
            or not isinstance(self.stale_after_s, (int, float))
            or self.stale_after_s < 0
        ):
            raise InvalidOptionError(
                f"stale_after_s must be 0 or more seconds, or None, not {self.stale_after_s!r}"
            )
        if self.telemetry_path is not None:
            object.__setattr__(self, "telemetry_path", os.fspath(self.telemetry_path))
        if self.upload is not None:
            _check_type("upload", self.upload, UploadPolicy)
        if self.memory is not None:
            _check_type("memory", self.memory, MemoryPolicy)

    @property
    def stale_s(self) -> float:
        """Age in seconds after which a leftover partial save is removed."""
        return self.timeout_s if self.stale_after_s is None else float(self.stale_after_s)


def _check_type(option: str, value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise InvalidOptionError(f"{option} must be a {kind.__name__}, not {value!r}")


#: keyword arguments that are spelled differently from the config's fields
_SPELLINGS = ("upload_to", "keep_local")


def manager_config(config: ManagerConfig | None, options: dict[str, object]) -> ManagerConfig:
    """``config`` (or the defaults) with the fields named in ``options`` replaced, validated.

    ``upload_to`` (a URL or an :class:`UploadPolicy`) and ``keep_local`` are accepted as
    a shorter way to give ``upload``.  ``None`` for an option means its default.
    """
    config = config if config is not None else ManagerConfig()
    _check_type("config", config, ManagerConfig)
    fields = {f.name for f in dataclasses.fields(ManagerConfig)}
    unknown = sorted(set(options) - fields - set(_SPELLINGS))
    if unknown:
        raise InvalidOptionError(
            f"CheckpointManager has no option {', '.join(map(repr, unknown))}; "
            f"options are {', '.join(sorted(fields | set(_SPELLINGS)))}"
        )
    given = {k: v for k, v in options.items() if v is not None and k in fields}
    upload_to, keep_local = options.get("upload_to"), options.get("keep_local")
    if upload_to is not None or keep_local is not None:
        if "upload" in given:
            raise InvalidOptionError("give the remote tier once: upload=, or upload_to= and keep_local=")
        given["upload"] = _upload_policy(upload_to, keep_local)
    return dataclasses.replace(config, **given)


def _upload_policy(upload_to: object, keep_local: object) -> UploadPolicy:
    if upload_to is None:
        raise InvalidOptionError(
            f"keep_local={keep_local!r} needs upload_to (a remote tier to keep the rest)"
        )
    if isinstance(upload_to, UploadPolicy):
        return upload_to if keep_local is None else dataclasses.replace(upload_to, keep_local=keep_local)
    if not isinstance(upload_to, (str, os.PathLike)):
        raise InvalidOptionError(f"upload_to must be a URL, a path or an UploadPolicy, not {upload_to!r}")
    if keep_local is None:
        return UploadPolicy(remote=os.fspath(upload_to))
    return UploadPolicy(remote=os.fspath(upload_to), keep_local=keep_local)
