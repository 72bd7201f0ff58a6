"""Adapters that make training frameworks checkpoint through stashpoint.

Each module needs its framework, installed with an extra, and is imported only when
asked for (``import stashpoint`` imports none of them):

* :mod:`stashpoint.integrations.hf_trainer`: a HuggingFace ``Trainer`` that saves and
  resumes through a :class:`~stashpoint.CheckpointManager` (``stashpoint[hf]``);
* :mod:`stashpoint.integrations.accelerate`: ``save_state`` / ``load_state`` for an
  ``accelerate.Accelerator`` (``stashpoint[accelerate]``);
* :mod:`stashpoint.integrations.lightning`: a Lightning ``CheckpointIO`` plugin, a
  DDP strategy that saves through it on every rank, and a ModelParallel (FSDP2/TP)
  strategy that saves and loads the sharded module in place (``stashpoint[lightning]``).

Nothing is pickled: values are stored as JSON and tensors as tensors, RNG states
included (:mod:`stashpoint.integrations.rng`).
"""
