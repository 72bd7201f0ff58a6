"""Moving checkpoints between stashpoint and other tools' formats."""

from stashpoint.convert.hf import ConvertSummary, export_hf, import_hf, strip_prefix

__all__ = ["ConvertSummary", "export_hf", "import_hf", "strip_prefix"]
