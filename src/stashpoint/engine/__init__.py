"""Executing plans: moving tensor bytes between memory and storage."""
