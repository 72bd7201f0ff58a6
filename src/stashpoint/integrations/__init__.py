"""Adapters that let other training frameworks write and read stashpoint checkpoints.

* :mod:`stashpoint.integrations.dcp`: ``StorageWriter`` / ``StorageReader`` for
  ``torch.distributed.checkpoint`` (``dcp.save``, ``dcp.async_save``, ``dcp.load``).
* :mod:`stashpoint.integrations.torchtitan`: a torchtitan checkpoint manager selected by
  the trainer's config.

Each adapter uses the public API and the engine only, and is imported on demand:
``import stashpoint`` never imports this package, and this package imports no adapter,
so a framework that is not installed costs nothing until its adapter is asked for.
"""
