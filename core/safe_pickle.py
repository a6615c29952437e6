"""Reading pickles from users' files without running them.

Mocap releases (GRAB's ``.npz`` of nested dicts, ARCTIC's ``.mano.npy``) and WebDataset shards
(``.keypoints.pkl`` members) store plain data as pickles, and a pickle can name any importable
callable: unpickling a planted file runs whatever it names. This module is the one reader every
plugin uses: an unpickler whose ``find_class`` admits only what rebuilds numpy arrays and scalars
(dicts, lists, tuples, strings and numbers need no class at all), so anything else is refused with
a :class:`~handforge.errors.DataError` naming the file and the global it asked for, before a
single call is made.

``allow_pickle=True`` never appears in handforge: :func:`load_npy` and :func:`load_npz` read the
``.npy`` header themselves and hand an object array's payload to the restricted unpickler.
"""
from __future__ import annotations

import io
import pathlib
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np

from .errors import DataError

# The globals numpy's pickles of arrays, dtypes and scalars name (numpy 1.x spells its core
# ``numpy.core``, numpy 2 ``numpy._core``; both read files written by the other), and the one
# codec call protocol-2 pickles use to carry an array's raw bytes.
ALLOWED_GLOBALS = frozenset({
    *((core, name) for core in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
    *((core, "_frombuffer") for core in ("numpy.core.numeric", "numpy._core.numeric")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file: BinaryIO, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(f"{self.where}: the pickle names {module}.{name}; only numpy arrays, dicts, "
                        "lists and scalars are read from pickles (nothing in it was run)")

    def persistent_load(self, pid):
        raise DataError(f"{self.where}: the pickle refers to an external object ({pid!r}); refused")


def loads(data: bytes, where: str) -> Any:
    """The plain data pickled in ``data`` (from ``where``, named in errors)."""
    return load(io.BytesIO(data), where)


def load(file: BinaryIO, where: str) -> Any:
    try:
        return RestrictedUnpickler(file, where).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError) as exc:
        raise DataError(f"{where}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def load_file(path, where: str | None = None) -> Any:
    """The plain data in the pickle file at ``path``."""
    path = pathlib.Path(path)
    try:
        with path.open("rb") as file:
            return load(file, where or str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def load_npy(file: BinaryIO, where: str) -> Any:
    """The array in one ``.npy`` stream; an object array (a pickled dict saved with ``np.save``)
    comes back as the object it holds (``np.save(dict)`` stores a 0-d object array)."""
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(f"{where}: not a .npy array ({exc})") from None
    if dtype.hasobject:
        value = load(file, where)
        if isinstance(value, np.ndarray) and value.shape == () and value.dtype.hasobject:
            return value.item()
        return value
    count = int(np.prod(shape, dtype=np.int64))
    raw = file.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise DataError(f"{where}: truncated .npy array (expected {count * dtype.itemsize} bytes of "
                        f"{dtype} {tuple(shape)}, found {len(raw)})")
    array = np.frombuffer(raw, dtype=dtype)
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def load_npz(path) -> dict[str, Any]:
    """Every member of the ``.npz`` at ``path`` by key (``poses``, ``lhand``, ...), object members
    through the restricted unpickler; a missing, truncated or foreign file is a DataError naming it."""
    path = pathlib.Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            found = {}
            for member in archive.namelist():
                key = member[:-4] if member.endswith(".npy") else member
                with archive.open(member) as stream:
                    found[key] = load_npy(io.BytesIO(stream.read()), f"{path} member {key!r}")
            return found
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def load_npy_file(path) -> Any:
    path = pathlib.Path(path)
    try:
        with path.open("rb") as file:
            return load_npy(file, str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
