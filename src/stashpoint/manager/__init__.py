"""CheckpointManager: when to save, what to keep, where to resume from."""

from stashpoint.manager.config import ManagerConfig
from stashpoint.manager.housekeeping import CheckpointInfo
from stashpoint.manager.manager import CheckpointManager
from stashpoint.manager.policy import RetentionPolicy, SavePolicy
from stashpoint.manager.tiering import UploadFailure, UploadPolicy

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "ManagerConfig",
    "RetentionPolicy",
    "SavePolicy",
    "UploadFailure",
    "UploadPolicy",
]
