"""The ``stashpoint demo`` job: FSDP2 training on CPU, saved at 2 ranks, resumed at 3."""
