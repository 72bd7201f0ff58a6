"""CheckpointManager: when to save and snapshot, what to keep, where to resume from."""

from stashpoint.manager.config import ManagerConfig
from stashpoint.manager.housekeeping import CheckpointInfo
from stashpoint.manager.manager import CheckpointManager
from stashpoint.manager.memory import MemoryPolicy, Recovered
from stashpoint.manager.policy import RetentionPolicy, SavePolicy
from stashpoint.manager.tiering import UploadFailure, UploadPolicy
from stashpoint.planning.protection import Parity, Replicate

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "ManagerConfig",
    "MemoryPolicy",
    "Parity",
    "Recovered",
    "Replicate",
    "RetentionPolicy",
    "SavePolicy",
    "UploadFailure",
    "UploadPolicy",
]
