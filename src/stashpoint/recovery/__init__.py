"""Recovering training state that no checkpoint holds.

The order of resort when a rank's state is lost: its copy in host memory (an async
save's staging), a peer's copy, the newest durable checkpoint (:class:`~stashpoint.
CheckpointManager`), and only when none of those has it, :mod:`.checkfree`: rebuilding
a lost pipeline stage from its neighbours' weights.
"""

from stashpoint.recovery.checkfree import StageRecovery, grad_norm, rebuild_stage

__all__ = ["StageRecovery", "grad_norm", "rebuild_stage"]
