"""Read PyTorch checkpoints (``pytorch_model.bin``, ``.pth``) without torch and without running code.

A torch checkpoint is a pickle, and unpickling an untrusted pickle can call any importable
function (``os.system``...). This reader never imports anything a file names: ``find_class`` is a
fixed table from the few names a tensor state dict needs to small local stand-ins, and every other
name is refused with :class:`~ufcpu.errors.UnsafePickleError`. Tensors come back from the pickle
as lazy records (storage, offset, size, stride); their bytes are read afterwards, checked against
the declared sizes, and copied into fresh numpy arrays.

Two layouts are understood (both written by ``torch.save``, see torch/serialization.py):

- zip (torch >= 1.6): ``<any folder>/data.pkl`` is the pickle, ``<folder>/data/<key>`` holds each
  storage's raw bytes, ``<folder>/byteorder`` (optional) says ``little`` or ``big``.
- legacy: a magic-number pickle, a protocol-version pickle (1001), a sys-info pickle, the main
  pickle, a pickle listing storage keys, then per key an 8-byte little-endian element count and
  the raw little-endian bytes.

Every failure is a :class:`~ufcpu.errors.CheckpointError` (or its subclass ``UnsafePickleError``)
whose one-line message starts with the file name, never a bare pickle/struct/zip traceback.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from ufcpu.errors import CheckpointError, UfcpuError, UnsafePickleError

__all__ = ["load_torch_checkpoint", "STORAGE_DTYPES"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
ZIP_SIGNATURE = b"PK\x03\x04"
TAR_SIGNATURE = (257, b"ustar")          # (offset, bytes): torch < 0.4 wrote tar archives

MAX_PICKLE_BYTES = 256 * 1024 * 1024     # a state dict's data.pkl is kilobytes; refuse absurd ones
MAX_PICKLE_LINE = 64 * 1024             # protocol-0 opcodes end at a newline; don't hunt for it forever
MAX_SMALL_MEMBER_BYTES = 64              # the byteorder record is "little" or "big"
MAX_TENSOR_DIMS = 64                     # torch's own limit on dimensions
MAX_MESSAGE_NAME = 120                   # keep hostile names from flooding the one-line message

# Storage class name -> numpy element type of its bytes. bfloat16 has no numpy type: its raw
# uint16 bits are widened to float32 by _CONVERTERS below.
STORAGE_DTYPES: dict[str, type] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.uint8,
    "UntypedStorage": np.uint8,
}

# torch's storage keys are str(int); anything else could steer the zip member lookup elsewhere.
_SAFE_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
_REFUSED_GLOBAL = "refused to load global {name!r} (only tensors and state dicts are allowed)"


# --- internal failures, turned into named CheckpointErrors at the API boundary ----------------

class _Refused(Exception):
    """The file asked for something hostile-looking; becomes UnsafePickleError with the file name."""


class _Malformed(Exception):
    """The file is damaged or not a state dict; becomes CheckpointError with the file name."""


def _one_line(text: str) -> str:
    """Zip member names and pickled strings may hold newlines; every message stays one line."""
    return " ".join(str(text).split())


def _short(text: str) -> str:
    """Hostile names can be long; keep them from flooding the message."""
    text = _one_line(text)
    return text if len(text) <= MAX_MESSAGE_NAME else text[:MAX_MESSAGE_NAME] + "..."


@contextmanager
def _named_errors(source: str) -> Iterator[None]:
    """Give every failure the file's name, and never let pickle/zip/struct internals leak out."""
    try:
        yield
    except UfcpuError:
        raise
    except _Refused as e:
        raise UnsafePickleError(_one_line(f"{source}: {e}")) from None
    except _Malformed as e:
        raise CheckpointError(_one_line(f"{source}: {e}")) from None
    except FileNotFoundError:
        raise CheckpointError(f"{source}: file not found") from None
    except (Exception) as e:  # noqa: BLE001 - a damaged file can raise almost anything
        detail = _short(str(e)) or "no detail"
        raise CheckpointError(_one_line(
            f"{source}: not a readable PyTorch checkpoint ({type(e).__name__}: {detail})")) from None


# --- objects the unpickler can produce ---------------------------------------------------------

class _Sealed:
    """Base of everything find_class/persistent_load hand out.

    The BUILD opcode sets attributes on whatever object is on the stack; letting it reach our
    shared stand-ins would let one file rewrite how the next one loads. ``__setstate__`` is the
    first thing BUILD looks for, so defining it to refuse closes that door (``__slots__`` leaves no
    ``__dict__`` to write into either).
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"refused to set state on {type(self).__name__.lstrip('_')} "
                       "(the BUILD opcode is only allowed on plain containers)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused(f"refused to set attribute {_short(name)!r}")

    def _init(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)


class _StorageType(_Sealed):
    """Stand-in for ``torch.FloatStorage`` and friends: only its numpy element type matters."""

    __slots__ = ("name", "dtype", "itemsize")

    def __init__(self, name: str):
        dtype = np.dtype(STORAGE_DTYPES[name])
        self._init(name=name, dtype=dtype, itemsize=dtype.itemsize)


class _TypeMarker(_Sealed):
    """Stand-in for ``torch.Tensor`` / ``nn.Parameter`` as the type argument of _rebuild_from_type_v2."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self._init(name=name)


class _Storage(_Sealed):
    """A run of elements inside one stored blob: legacy files can hand out views into a root."""

    __slots__ = ("key", "stype", "offset", "numel")

    def __init__(self, key: str, stype: _StorageType, offset: int, numel: int):
        self._init(key=key, stype=stype, offset=offset, numel=numel)


class _LazyTensor(_Sealed):
    """What a rebuild function returns: geometry only; the bytes are read after unpickling."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self._init(storage=storage, offset=offset, size=size, stride=stride)


class _SafeCallable(_Sealed):
    """Wraps an allowed callable so BUILD cannot write to the function object (``__defaults__``)."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]):
        self._init(name=name, fn=fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


# --- local stand-ins for torch's rebuild functions ----------------------------------------------

def _is_int(value: Any) -> bool:
    return type(value) is int


def _check_geometry(storage: Any, offset: Any, size: Any, stride: Any) -> tuple[tuple, tuple]:
    """Reject anything but a storage plus int geometry now, before it can reach numpy."""
    if not isinstance(storage, _Storage):
        raise _Malformed(f"tensor built from a {type(storage).__name__}, not a storage")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
        raise _Malformed("tensor size/stride are not tuples")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or len(size) > MAX_TENSOR_DIMS:
        raise _Malformed(f"tensor has {len(size)} sizes and {len(stride)} strides")
    numbers = (offset,) + size + stride
    if not all(_is_int(n) and n >= 0 for n in numbers):
        raise _Malformed("tensor offset/size/stride must be non-negative integers")
    return size, stride


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _LazyTensor:
    """torch._utils._rebuild_tensor: the pre-1.0 form, still accepted by torch.load."""
    size, stride = _check_geometry(storage, storage_offset, size, stride)
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _LazyTensor:
    """torch._utils._rebuild_tensor_v2: autograd flags, hooks and metadata do not matter here."""
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _expect_tensor(data: Any, what: str) -> _LazyTensor:
    if not isinstance(data, _LazyTensor):
        raise _Malformed(f"{what} wraps a {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _LazyTensor:
    """torch._utils._rebuild_parameter: an nn.Parameter is its tensor for inference."""
    return _expect_tensor(data, "parameter")


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any,
                                  state: Any) -> _LazyTensor:
    """torch._utils._rebuild_parameter_with_state: Python attributes on a parameter are dropped."""
    return _expect_tensor(data, "parameter")


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> _LazyTensor:
    """torch._tensor._rebuild_from_type_v2: a tensor with Python attributes; keep the tensor only.

    ``func`` can only be something find_class handed out, so calling it runs our own code.
    """
    if not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
        raise _Malformed("malformed _rebuild_from_type_v2 call")
    if not isinstance(func, _SafeCallable) or func.fn not in _TENSOR_REBUILDERS:
        raise _Malformed("_rebuild_from_type_v2 does not rebuild a tensor")
    return _expect_tensor(func(*args), "_rebuild_from_type_v2")


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter,
                      _rebuild_parameter_with_state)


def _allowed_globals() -> dict[tuple[str, str], _Sealed]:
    """The complete allow-list: (module, name) exactly as written in the pickle -> stand-in.

    Names are compared as whole strings, so dotted tricks (``torch._utils.os``,
    ``OrderedDict.__class__``) and Python 2 aliases (``__builtin__``) simply miss.
    """
    table: dict[tuple[str, str], _Sealed] = {
        ("collections", "OrderedDict"): _SafeCallable("OrderedDict", OrderedDict),
        ("torch._utils", "_rebuild_tensor"): _SafeCallable("_rebuild_tensor", _rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _SafeCallable("_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_parameter"): _SafeCallable("_rebuild_parameter", _rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"):
            _SafeCallable("_rebuild_parameter_with_state", _rebuild_parameter_with_state),
        ("torch._tensor", "_rebuild_from_type_v2"):
            _SafeCallable("_rebuild_from_type_v2", _rebuild_from_type_v2),
        ("torch", "Tensor"): _TypeMarker("Tensor"),
        ("torch.nn.parameter", "Parameter"): _TypeMarker("Parameter"),
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
    }
    for name in STORAGE_DTYPES:
        table[("torch", name)] = _StorageType(name)
    return table


ALLOWED_GLOBALS = _allowed_globals()


# --- persistent ids: ('storage', type, key, location, numel[, view]) ------------------------------

def _storage_root(pid: tuple, roots: dict[str, tuple[_StorageType, int]]) -> tuple[str, _StorageType, int]:
    """Check the fields shared by both layouts and record the root blob each key names.

    One key must always mean one blob: a file that declares the same key with two types or
    lengths is contradicting itself, and picking either would read the wrong bytes.
    """
    _, stype, key, _location, numel = pid[:5]
    if not isinstance(stype, _StorageType):
        raise _Malformed(f"storage type is a {type(stype).__name__}, not a torch storage class")
    if not (isinstance(key, str) and _SAFE_STORAGE_KEY.fullmatch(key)):
        raise _Malformed(f"invalid storage key {_short(repr(key))}")
    if not (_is_int(numel) and numel >= 0):
        raise _Malformed(f"storage {key!r} has an invalid element count")
    known = roots.setdefault(key, (stype, numel))
    if known != (stype, numel):
        raise _Malformed(f"storage {key!r} is declared twice with different types or sizes")
    return key, stype, numel


def _zip_storage(pid: tuple, roots: dict) -> _Storage:
    """Zip layout: ('storage', type, key, location, numel); numel counts elements of type."""
    if len(pid) != 5:
        raise _Malformed(f"storage id has {len(pid)} fields, expected 5")
    key, stype, numel = _storage_root(pid, roots)
    return _Storage(key, stype, 0, numel)


def _legacy_storage(pid: tuple, roots: dict) -> _Storage:
    """Legacy layout adds view metadata: None, or (view_key, offset, numel) into the root."""
    if len(pid) != 6:
        raise _Malformed(f"storage id has {len(pid)} fields, expected 6")
    key, stype, numel = _storage_root(pid, roots)
    view = pid[5]
    if view is None:
        return _Storage(key, stype, 0, numel)
    if not (isinstance(view, tuple) and len(view) == 3):
        raise _Malformed(f"storage {key!r} has malformed view metadata")
    _view_key, offset, length = view
    if not (_is_int(offset) and _is_int(length) and 0 <= offset and 0 <= length
            and offset + length <= numel):
        raise _Malformed(f"storage view into {key!r} is out of range")
    return _Storage(key, stype, offset, length)


_PERSISTENT_LOADERS = {"zip": _zip_storage, "legacy": _legacy_storage}


class _SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come only from ALLOWED_GLOBALS.

    ``layout`` selects how persistent ids (tensor storages) are parsed; None refuses them, which
    is what the small header pickles of the legacy layout get.
    """

    def __init__(self, file: BinaryIO, layout: str | None = None,
                 allowed: dict[tuple[str, str], _Sealed] | None = None):
        super().__init__(file)
        self._layout = layout
        self._allowed = ALLOWED_GLOBALS if allowed is None else allowed
        self.roots: dict[str, tuple[_StorageType, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        stand_in = self._allowed.get((module, name))
        if stand_in is None:
            raise _Refused(_REFUSED_GLOBAL.format(name=_short(f"{module}.{name}")))
        return stand_in

    def persistent_load(self, pid: Any) -> _Storage:
        loader = _PERSISTENT_LOADERS.get(self._layout)
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        if kind == "module":
            raise _Refused("refused a pickled nn.Module (only tensors and state dicts are allowed)")
        if loader is None or kind != "storage":
            raise _Refused("refused a persistent id that is not a tensor storage")
        return loader(pid, self.roots)


# Opcodes torch.save never writes and a state dict never needs. The protocol-5 buffer opcodes
# also trip a CPython bug: a truncated BYTEARRAY8 frees a bytearray whose buffer is still exported.
# INST/OBJ/EXT* would still have to pass find_class; refusing them is defence in depth.
_REFUSED_OPCODES = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER",
                              "INST", "OBJ", "EXT1", "EXT2", "EXT4"})


class _BoundedReader:
    """The file as pickletools sees it: no read may ask for more than the bytes that remain.

    A hostile length field (BINBYTES8 of 2**60) must fail as "truncated", not as a huge
    allocation, and a newline-terminated field must not scan a gigabyte of tensor data.
    """

    def __init__(self, file: BinaryIO, end: int):
        self._file, self._end = file, end

    def tell(self) -> int:
        return self._file.tell()

    def _left(self) -> int:
        return max(0, self._end - self._file.tell())

    def read(self, n: int = -1) -> bytes:
        return self._file.read(self._left() if n < 0 else min(n, self._left()))

    def readline(self) -> bytes:
        return self._file.readline(min(MAX_PICKLE_LINE, self._left()))


def _pickle_length(file: BinaryIO, end: int) -> int:
    """Walk one pickle's opcodes without executing any and return its length in bytes.

    Running this first means the C unpickler only ever sees a stream whose lengths are
    consistent, whose size is sane, and which uses no refused opcode.
    """
    start = file.tell()
    with warnings.catch_warnings():  # pickletools warns about bad escapes in protocol-0 strings
        warnings.simplefilter("ignore", DeprecationWarning)
        for opcode, _arg, pos in pickletools.genops(_BoundedReader(file, end)):
            if opcode.name in _REFUSED_OPCODES:
                raise _Refused(f"refused pickle opcode {opcode.name} (only tensors and state "
                               "dicts are allowed)")
            if pos - start > MAX_PICKLE_BYTES:
                raise _Malformed(f"pickle is larger than the {MAX_PICKLE_BYTES} bytes allowed")
    return file.tell() - start


def _unpickle(file: BinaryIO, end: int, layout: str | None = None,
              allowed: dict | None = None) -> tuple[Any, dict]:
    """Load the pickle at the file's position (vetted first) and leave the file just after it."""
    start = file.tell()
    with _damaged_pickle():
        length = _pickle_length(file, end)
    file.seek(start)
    data = file.read(length)
    unpickler = _SafeUnpickler(io.BytesIO(data), layout, allowed)
    with _damaged_pickle():
        result = unpickler.load()
    file.seek(start + length)
    return result, unpickler.roots


@contextmanager
def _damaged_pickle() -> Iterator[None]:
    """Opcode-level garbage (bad lengths, stack underflow, bad memo keys) means a damaged file."""
    try:
        yield
    except (_Refused, _Malformed):
        raise
    except Exception as e:  # noqa: BLE001 - pickle reports damage through many exception types
        raise _Malformed(f"damaged pickle ({type(e).__name__}: {_short(str(e))})") from None


# --- from the unpickled object to named lazy tensors ------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model")


def _state_dict(obj: Any) -> dict[str, _LazyTensor]:
    """The tensors of a state dict, unwrapping ``{"state_dict": ...}`` / ``{"model": ...}``.

    Training checkpoints keep the weights under one of those keys next to optimizer state and
    counters; non-tensor values (epoch numbers, strings) are not weights and are skipped.
    """
    if not isinstance(obj, dict):
        raise _Malformed(f"top-level object is a {type(obj).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {}
    for name, value in obj.items():
        if not isinstance(value, _LazyTensor):
            continue
        if not isinstance(name, str):
            raise _Malformed(f"state dict key is a {type(name).__name__}, not a string")
        tensors[name] = value
    if not tensors:
        raise _Malformed("no tensors found in the state dict")
    return tensors


# --- from lazy tensors to numpy arrays --------------------------------------------------------

def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 stored bits up and reinterpret."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_bool(raw: np.ndarray) -> np.ndarray:
    """torch bools are bytes; any non-zero byte is True (numpy bools must be exactly 0/1)."""
    return raw != 0


_CONVERTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "BFloat16Storage": _bfloat16_to_float32,
    "BoolStorage": _to_bool,
}


def _view(name: str, tensor: _LazyTensor, blob: np.ndarray, byteorder: str) -> np.ndarray:
    """A strided numpy view of the tensor, after proving it lies inside its storage.

    The element count may not exceed the storage's: legitimate state-dict tensors never do, and
    a zero stride with a huge size would otherwise make a tiny file allocate terabytes.
    """
    storage = tensor.storage
    dtype = np.dtype(STORAGE_DTYPES[storage.stype.name]).newbyteorder(byteorder)
    flat = blob.view(dtype)[storage.offset:storage.offset + storage.numel]
    count = math.prod(tensor.size)
    if count == 0:
        return np.empty(tensor.size, dtype)
    extent = tensor.offset + 1 + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if extent > flat.size or count > flat.size:
        raise _Malformed(f"tensor {_short(repr(name))} (offset {tensor.offset}, size "
                         f"{list(tensor.size)}, stride {list(tensor.stride)}) does not fit in "
                         f"its storage of {flat.size} elements")
    strides = tuple(s * dtype.itemsize for s in tensor.stride)
    return np.lib.stride_tricks.as_strided(flat[tensor.offset:], tensor.size, strides, writeable=False)


def _materialize(name: str, tensor: _LazyTensor, blob: np.ndarray, byteorder: str) -> np.ndarray:
    """A fresh, C-contiguous, native-endian array: never a view into the file's bytes.

    Tensors that share a storage (tied weights) come out as independent arrays, so a caller
    editing one cannot silently change another.
    """
    view = _view(name, tensor, blob, byteorder)
    converter = _CONVERTERS.get(tensor.storage.stype.name)
    if converter is not None:
        return np.ascontiguousarray(converter(view))
    return np.array(view, dtype=view.dtype.newbyteorder("="), order="C", copy=True)


BlobReader = Callable[[str, int], np.ndarray]


def _materialize_all(tensors: dict[str, _LazyTensor], read_blob: BlobReader,
                     byteorder: str) -> dict[str, np.ndarray]:
    """Read each needed storage once, cut its tensors out, then drop it (peak = one storage)."""
    by_key: dict[str, list[str]] = {}
    for name, tensor in tensors.items():
        by_key.setdefault(tensor.storage.key, []).append(name)
    arrays: dict[str, np.ndarray] = {}
    for key, names in by_key.items():
        blob = read_blob(key, tensors[names[0]].storage.stype.itemsize)
        for name in names:
            arrays[name] = _materialize(name, tensors[name], blob, byteorder)
        del blob
    return {name: arrays[name] for name in tensors}


# --- zip layout -------------------------------------------------------------------------------

def _unsafe_member_name(name: str) -> bool:
    """Absolute paths, drive letters, backslashes and '..' have no place in a torch archive."""
    parts = name.split("/")
    return (name.startswith("/") or "\\" in name or "\x00" in name or ":" in parts[0]
            or ".." in parts)


def _check_members(zf: zipfile.ZipFile) -> list[str]:
    names = zf.namelist()
    for name in names:
        if _unsafe_member_name(name):
            raise _Refused(f"refused zip member {_short(repr(name))} (unsafe path)")
    if len(set(names)) != len(names):
        raise _Malformed("zip archive has duplicate member names")
    return names


def _archive_prefix(names: list[str]) -> str:
    """The single top-level folder holding data.pkl; torch names it after the file or 'archive'."""
    found = [n[: -len("data.pkl")] for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(found) != 1:
        raise _Malformed("zip archive is not a torch checkpoint (expected exactly one "
                         f"<folder>/data.pkl, found {len(found)})")
    prefix = found[0]
    if prefix + "constants.pkl" in names:
        raise _Malformed("this is a TorchScript archive (torch.jit.save), not a state dict; "
                         "save it with torch.save(model.state_dict())")
    return prefix


def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """Read one member into memory after checking its declared size (never extracted to disk)."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise _Malformed(f"{name} is {info.file_size} bytes, more than the {limit} allowed")
    data = zf.read(info)
    if len(data) != info.file_size:
        raise _Malformed(f"{name} is truncated")
    return data


_BYTEORDERS = {b"little": "<", b"big": ">"}


def _zip_byteorder(zf: zipfile.ZipFile, names: list[str], prefix: str) -> str:
    """Files without a byteorder record are little-endian (torch's default since 2.1)."""
    if prefix + "byteorder" not in names:
        return "<"
    marker = _read_member(zf, prefix + "byteorder", MAX_SMALL_MEMBER_BYTES).strip()
    if marker not in _BYTEORDERS:
        raise _Malformed(f"unknown byte order {_short(repr(marker))}")
    return _BYTEORDERS[marker]


def _zip_blob_reader(zf: zipfile.ZipFile, prefix: str, roots: dict) -> BlobReader:
    def read_blob(key: str, itemsize: int) -> np.ndarray:
        name = f"{prefix}data/{key}"
        stype, numel = roots[key]
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise _Malformed(f"storage {name} is missing from the archive") from None
        if info.file_size != numel * itemsize:
            raise _Malformed(f"storage {name} holds {info.file_size} bytes, but {numel} "
                             f"{stype.name} elements need {numel * itemsize}")
        data = _read_member(zf, name, numel * itemsize)
        return np.frombuffer(data, dtype=np.uint8)
    return read_blob


def _load_zip(file: BinaryIO) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(file) as zf:
        names = _check_members(zf)
        prefix = _archive_prefix(names)
        byteorder = _zip_byteorder(zf, names, prefix)
        data_pkl = _read_member(zf, prefix + "data.pkl", MAX_PICKLE_BYTES)
        obj, roots = _unpickle(io.BytesIO(data_pkl), len(data_pkl), "zip")
        tensors = _state_dict(obj)
        return _materialize_all(tensors, _zip_blob_reader(zf, prefix, roots), byteorder)


# --- legacy layout ----------------------------------------------------------------------------

_NOTHING_ALLOWED: dict = {}
_LEGACY_COUNT = struct.Struct("<q")


def _legacy_header(file: BinaryIO, end: int) -> None:
    """Magic number, protocol version and sys-info: three tiny pickles with no globals at all."""
    magic, _ = _unpickle(file, end, allowed=_NOTHING_ALLOWED)
    if not (_is_int(magic) and magic == LEGACY_MAGIC_NUMBER):
        raise _Malformed("not a PyTorch checkpoint (no zip header and no legacy magic number)")
    version, _ = _unpickle(file, end, allowed=_NOTHING_ALLOWED)
    if not (_is_int(version) and version == LEGACY_PROTOCOL_VERSION):
        raise _Malformed(f"unsupported legacy protocol version {_short(repr(version))}")
    _unpickle(file, end, allowed=_NOTHING_ALLOWED)  # sys_info: data is always little-endian anyway


def _legacy_storage_keys(file: BinaryIO, end: int) -> list[str]:
    keys, _ = _unpickle(file, end, allowed=_NOTHING_ALLOWED)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _Malformed("legacy storage key list is malformed")
    if len(set(keys)) != len(keys):
        raise _Malformed("legacy storage key list has duplicates")
    return keys


def _legacy_offsets(file: BinaryIO, keys: list[str], roots: dict, file_size: int) -> dict[str, int]:
    """Walk the storage records (count, bytes) and remember where each one's bytes start.

    Each count must match what the pickle declared and each record must fit in the file, so a
    hostile count can neither misplace later storages nor trigger a huge read.
    """
    offsets = {}
    for key in keys:
        if key not in roots:
            raise _Malformed(f"storage {key!r} is listed but never used by the pickle")
        header = file.read(_LEGACY_COUNT.size)
        if len(header) != _LEGACY_COUNT.size:
            raise _Malformed(f"file is truncated at storage {key!r}")
        (count,) = _LEGACY_COUNT.unpack(header)
        stype, numel = roots[key]
        if count != numel:
            raise _Malformed(f"storage {key!r} holds {count} elements, the pickle declared {numel}")
        start = file.tell()
        if start + numel * stype.itemsize > file_size:
            raise _Malformed(f"file is truncated inside storage {key!r}")
        offsets[key] = start
        file.seek(numel * stype.itemsize, os.SEEK_CUR)
    missing = sorted(set(roots) - set(offsets))
    if missing:
        raise _Malformed(f"storage {missing[0]!r} is used by the pickle but missing from the file")
    return offsets


def _legacy_blob_reader(file: BinaryIO, offsets: dict[str, int], roots: dict) -> BlobReader:
    def read_blob(key: str, itemsize: int) -> np.ndarray:
        _, numel = roots[key]
        file.seek(offsets[key])
        data = file.read(numel * itemsize)
        if len(data) != numel * itemsize:
            raise _Malformed(f"file is truncated inside storage {key!r}")
        return np.frombuffer(data, dtype=np.uint8)
    return read_blob


def _load_legacy(file: BinaryIO) -> dict[str, np.ndarray]:
    file_size = os.fstat(file.fileno()).st_size
    _legacy_header(file, file_size)
    obj, roots = _unpickle(file, file_size, "legacy")
    keys = _legacy_storage_keys(file, file_size)
    offsets = _legacy_offsets(file, keys, roots, file_size)
    tensors = _state_dict(obj)
    return _materialize_all(tensors, _legacy_blob_reader(file, offsets, roots), "<")


# --- entry point ------------------------------------------------------------------------------

def _layout(head: bytes) -> Callable[[BinaryIO], dict[str, np.ndarray]]:
    """torch.load tells the layouts apart by the zip signature at byte 0; we do the same."""
    if head.startswith(ZIP_SIGNATURE):
        return _load_zip
    offset, signature = TAR_SIGNATURE
    if head[offset:offset + len(signature)] == signature:
        raise _Malformed("tar-based checkpoint from torch < 0.4 is not supported; "
                         "re-save it with a current torch.save")
    return _load_legacy


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch.save'd state dict as ``{name: numpy array}`` without importing torch.

    Arrays are fresh C-contiguous copies; float16 stays float16 (the caller casts), bfloat16
    becomes float32, bool stays bool. Non-tensor entries are skipped, and a top-level
    ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped.

    Raises CheckpointError naming the file for anything damaged or unsupported, and its subclass
    UnsafePickleError when the file asks for code (any global outside the tensor allow-list).
    """
    source = os.fspath(path)
    with _named_errors(str(source)):
        with open(source, "rb") as file:
            head = file.read(512)
            file.seek(0)
            return _layout(head)(file)
