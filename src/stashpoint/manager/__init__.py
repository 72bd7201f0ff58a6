"""CheckpointManager: when to save, what to keep, where to resume from."""

from stashpoint.manager.manager import CheckpointInfo, CheckpointManager
from stashpoint.manager.policy import RetentionPolicy, SavePolicy
from stashpoint.manager.tiering import UploadFailure, UploadPolicy

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "RetentionPolicy",
    "SavePolicy",
    "UploadFailure",
    "UploadPolicy",
]
