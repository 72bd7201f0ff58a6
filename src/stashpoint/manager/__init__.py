"""CheckpointManager: when to save, what to keep, where to resume from."""

from stashpoint.manager.manager import CheckpointInfo, CheckpointManager
from stashpoint.manager.policy import RetentionPolicy, SavePolicy

__all__ = ["CheckpointInfo", "CheckpointManager", "RetentionPolicy", "SavePolicy"]
