"""Adapters that make training frameworks checkpoint through stashpoint.

Each module needs its framework, installed with an extra, and is imported only when
asked for (``import stashpoint`` imports none of them):

* :mod:`stashpoint.integrations.hf_trainer`: a HuggingFace ``Trainer`` that saves and
  resumes through a :class:`~stashpoint.CheckpointManager` (``stashpoint[hf]``);
* :mod:`stashpoint.integrations.accelerate`: ``save_state`` / ``load_state`` for an
  ``accelerate.Accelerator`` (``stashpoint[accelerate]``);
* :mod:`stashpoint.integrations.lightning`: a Lightning ``CheckpointIO`` plugin and a
  DDP strategy that saves through it on every rank (``stashpoint[lightning]``).

Nothing is pickled: values are stored as JSON and tensors as tensors, RNG states
included (:mod:`stashpoint.integrations.rng`).
"""
