"""DCP's ``.metadata`` read without torch: an allowlist unpickler that builds local stand-ins for the classes
``FileSystemReader.read_metadata`` would build (DCP's metadata dataclasses, ``torch.Size``, dtypes).

Importing torch costs seconds of a merge that moves a gigabyte in about one; nothing here needs it. A name outside
the allowlist is refused (nothing from the file runs). Dtypes are kept as torch's attribute names ("bfloat16").
"""

from __future__ import annotations

import pickle
from typing import Any

_MD = "torch.distributed.checkpoint.metadata"
# torch 2.13's dtypes, as a pickle names them (torch.<name>): any may appear, e.g. in an optimizer entry left out
TORCH_DTYPE_NAMES = frozenset(
    [
        "bfloat16",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bool",
        "complex128",
        "complex32",
        "complex64",
        "float16",
        "float32",
        "float4_e2m1fn_x2",
        "float64",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "int1",
        "int16",
        "int2",
        "int3",
        "int32",
        "int4",
        "int5",
        "int6",
        "int64",
        "int7",
        "int8",
        "qint32",
        "qint8",
        "quint2x4",
        "quint4x2",
        "quint8",
        "uint1",
        "uint16",
        "uint2",
        "uint3",
        "uint32",
        "uint4",
        "uint5",
        "uint6",
        "uint64",
        "uint7",
        "uint8",
    ]
)


class _StandIn:
    """A pickled dataclass: whatever state it was saved with, as attributes."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{type(self).__name__} has state of type {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class Metadata(_StandIn):
    state_dict_metadata: Any = None
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: Any = None
    version: Any = None


class TensorStorageMetadata(_StandIn):
    properties: Any = None
    size: Any = None
    chunks: Any = None


class BytesStorageMetadata(_StandIn):
    pass


class ChunkStorageMetadata(_StandIn):
    offsets: Any = None
    sizes: Any = None


class TensorProperties(_StandIn):
    dtype: Any = None

    def __setstate__(self, state: Any) -> None:  # torch pickles (dtype, layout, requires_grad, memory format, pin)
        if isinstance(state, tuple) and len(state) == 5:
            self.dtype = state[0]
            return
        super().__setstate__(state)


class StorageMeta(_StandIn):
    pass


class MetadataIndex(_StandIn):
    fqn: Any = None
    offset: Any = None


class StorageInfo(_StandIn):
    """filesystem's ``_StorageInfo``: one chunk's file and byte range."""

    relative_path: Any = None
    offset: Any = None
    length: Any = None
    transform_descriptors: Any = None


class DType(str):
    """A torch dtype, by its attribute name."""


def _size(*args: Any) -> tuple:
    return tuple(args[0]) if args else ()


def _plain(*args: Any) -> Any:
    return args[0] if args else None


_CLASSES: dict[tuple[str, str], Any] = {
    (_MD, "Metadata"): Metadata,
    (_MD, "TensorStorageMetadata"): TensorStorageMetadata,
    (_MD, "BytesStorageMetadata"): BytesStorageMetadata,
    (_MD, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_MD, "TensorProperties"): TensorProperties,
    (_MD, "StorageMeta"): StorageMeta,
    (_MD, "MetadataIndex"): MetadataIndex,
    (_MD, "_MEM_FORMAT_ENCODING"): _plain,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): StorageInfo,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _plain,
}
_STDLIB = {("pathlib", n) for n in ("PosixPath", "WindowsPath", "PurePosixPath")} | {("collections", "OrderedDict")}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CLASSES:
            return _CLASSES[(module, name)]
        if module == "torch" and name in TORCH_DTYPE_NAMES:
            return DType(name)
        if (module, name) in _STDLIB:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")
