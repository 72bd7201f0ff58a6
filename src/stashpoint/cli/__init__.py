"""The ``stashpoint`` command line."""
