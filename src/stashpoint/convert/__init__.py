"""Moving checkpoints between stashpoint and other tools' formats.

:func:`convert` picks the pipeline from the source's format (:func:`detect_format`);
the import and export functions below are the pipelines.  stashpoint also *reads* DCP
checkpoints and HF safetensors directories in place: :func:`stashpoint.load`,
:func:`stashpoint.load_full` and ``stashpoint inspect`` accept their directories
directly (see :mod:`stashpoint.foreign`, :func:`load_hf`).

``stashpoint.convert`` is this package and, called, the function :func:`convert`: the
import system binds a package to its parent's attribute of the same name, so the
package itself is made callable rather than shadowing the function.
"""

import sys
import types

from stashpoint.convert.dcp import export_dcp, import_dcp
from stashpoint.convert.experts import ExpertSplit
from stashpoint.convert.hf import export_hf, import_hf, load_hf, strip_prefix
from stashpoint.convert.route import convert, detect_format
from stashpoint.convert.stream import ConvertSummary
from stashpoint.convert.torch_save import import_torch_save


class _CallablePackage(types.ModuleType):
    """``stashpoint.convert(src, dst, to=...)`` calls :func:`convert`."""

    def __call__(self, *args: object, **kwargs: object) -> ConvertSummary:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "ConvertSummary",
    "ExpertSplit",
    "convert",
    "detect_format",
    "export_dcp",
    "export_hf",
    "import_dcp",
    "import_hf",
    "import_torch_save",
    "load_hf",
    "strip_prefix",
]
