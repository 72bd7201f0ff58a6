"""Adapters that make training frameworks checkpoint through stashpoint.

Each module needs its framework, installed with an extra, and is imported only when
asked for (``import stashpoint`` never imports this package, and this package imports
no adapter, so a framework that is not installed costs nothing):

* :mod:`stashpoint.integrations.dcp`: ``StorageWriter`` / ``StorageReader`` for
  ``torch.distributed.checkpoint`` (``dcp.save``, ``dcp.async_save``, ``dcp.load``);
* :mod:`stashpoint.integrations.torchtitan`: a torchtitan checkpoint manager selected by
  the trainer's config (``stashpoint[torchtitan]``);
* :mod:`stashpoint.integrations.hf_trainer`: a HuggingFace ``Trainer`` that saves and
  resumes through a :class:`~stashpoint.CheckpointManager` (``stashpoint[hf]``);
* :mod:`stashpoint.integrations.accelerate`: ``save_state`` / ``load_state`` for an
  ``accelerate.Accelerator`` (``stashpoint[accelerate]``);
* :mod:`stashpoint.integrations.lightning`: a Lightning ``CheckpointIO`` plugin, a
  DDP strategy that saves through it on every rank, and a ModelParallel (FSDP2/TP)
  strategy that saves and loads the sharded module in place (``stashpoint[lightning]``);
* :mod:`stashpoint.integrations.torchft`: a torchft ``CheckpointTransport`` that heals a
  replica group from a healthy one's memory snapshot, over HTTP (``stashpoint[torchft]``).

Nothing is pickled unless asked for: values are stored as JSON and tensors as tensors,
RNG states included (:mod:`stashpoint.integrations.rng`).
"""
