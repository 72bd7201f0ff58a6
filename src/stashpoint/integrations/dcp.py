"""PyTorch DCP reading and writing stashpoint checkpoints.

::

    import torch.distributed.checkpoint as dcp
    from stashpoint.integrations.dcp import StashpointReader, StashpointWriter

    dcp.save(state_dict, storage_writer=StashpointWriter("ckpt/step-100", step=100))
    dcp.async_save(state_dict, storage_writer=StashpointWriter("ckpt/step-200"))
    dcp.load(state_dict, storage_reader=StashpointReader("ckpt/step-100"))

What DCP writes this way is an ordinary stashpoint checkpoint (``stashpoint.load`` reads it
at any world size, ``stashpoint verify`` checks it), and ``dcp.load`` reads any stashpoint
checkpoint, whoever wrote it.  See :mod:`.dcp_writer` and :mod:`.dcp_reader`.
"""

from stashpoint.integrations.dcp_reader import StashpointReader
from stashpoint.integrations.dcp_writer import StashpointWriter

__all__ = ["StashpointReader", "StashpointWriter"]
