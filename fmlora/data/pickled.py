"""Reading CIFAR-100's pickled files without executing arbitrary pickle code: an unpickler that
builds numpy arrays and plain containers only, and refuses every other global.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fmlora.errors import DataError

__all__ = ["field_of", "load_pickle"]


def _numpy_attr(*dotted: str) -> Any:
    """The first of several spellings of a numpy attribute that exists (numpy 2 moved ``core``)."""
    for name in dotted:
        obj: Any = np
        try:
            for part in name.split(".")[1:]:
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ImportError(f"numpy has none of {dotted}")


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles (protocol < 3) use it for bytes, and nothing else."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise DataError("pickle uses _codecs.encode for something other than bytes; refusing to load it")
    return text.encode("latin-1")


_RECONSTRUCT = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
_SCALAR = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
_FROMBUFFER = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")

# (module, name) as written in the pickle -> the object it may resolve to. Only what rebuilds plain
# numpy arrays and scalars; anything else (os.system, builtins.eval, ...) is refused.
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/numbers/strings and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in dataset files"
            ) from None


def load_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"cannot read {path} as a CIFAR pickle: {exc}") from exc


def field_of(record: Any, key: str, path: Path) -> Any:
    if isinstance(record, dict):
        for k in (key.encode(), key):
            if k in record:
                return record[k]
    raise DataError(f"{path} has no {key!r} entry; is it the CIFAR-100 python version (cifar-100-python.tar.gz)?")


# -- shared helpers ------------------------------------------------------------------------------
