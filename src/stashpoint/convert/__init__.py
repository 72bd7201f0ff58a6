"""Moving checkpoints between stashpoint and other tools' formats.

stashpoint also *reads* DCP checkpoints and HF safetensors directories in place:
:func:`stashpoint.load`, :func:`stashpoint.load_full` and ``stashpoint inspect`` accept
their directories directly (see :mod:`stashpoint.foreign`, :func:`load_hf`).
"""

from stashpoint.convert.dcp import export_dcp, import_dcp
from stashpoint.convert.hf import export_hf, import_hf, load_hf, strip_prefix
from stashpoint.convert.stream import ConvertSummary
from stashpoint.convert.torch_save import import_torch_save

__all__ = [
    "ConvertSummary",
    "export_dcp",
    "export_hf",
    "import_dcp",
    "import_hf",
    "import_torch_save",
    "load_hf",
    "strip_prefix",
]
