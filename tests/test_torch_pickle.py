"""Tests for weights_convert.torch_pickle, written without torch.

Checkpoints are built by hand: a pure-Python pickler subclass writes the torch globals
(``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``...) as plain GLOBAL/STACK_GLOBAL
opcodes from ``Global`` markers, so nothing named torch is ever imported or faked in sys.modules.
Malicious payloads are the real thing (``os.system("touch marker")``...): each test checks the
load is refused AND that the marker file was not created.
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufcpu.errors import CheckpointError, UnsafePickleError
from weights_convert import torch_pickle
from weights_convert.torch_pickle import load_torch_checkpoint

MAGIC = 0x1950A86A20F9469CFC6C
LAYOUTS = ("zip", "legacy")


# --- a torch-free torch.save ------------------------------------------------------------------

class Global:
    """A pickle global ``module.name`` written by name only: never imported, never called."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that a reduce function is callable
        raise AssertionError("test globals are never called")


class Reduce:
    """Pickles as ``func(*args)``, followed by BUILD(state) when a state is given."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)

    def __call__(self, *args):  # so a Reduce can itself be the function of another Reduce
        raise AssertionError("test payloads are never called")


DTYPE_STORAGES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
STORAGE_GLOBALS: dict[str, Global] = {}


def storage_global(type_name: str) -> Global:
    """One Global object per storage type, like a real pickler's memo would share it."""
    return STORAGE_GLOBALS.setdefault(type_name, Global("torch", type_name))


class Storage:
    """A torch storage: raw little-endian bytes plus the fields its persistent id carries."""

    def __init__(self, key: str, data: np.ndarray | bytes, type_name: str | None = None,
                 numel: int | None = None, view=None):
        if isinstance(data, np.ndarray):
            type_name = type_name or DTYPE_STORAGES[data.dtype]
            numel = data.size if numel is None else numel
            data = data.astype(data.dtype.newbyteorder("<")).tobytes()
        self.key, self.raw, self.type_name, self.numel, self.view = key, data, type_name, numel, view

    def pid(self, layout: str):
        head = ("storage", storage_global(self.type_name), self.key, "cpu", self.numel)
        return head if layout == "zip" else head + (self.view,)


REBUILD_V2 = Global("torch._utils", "_rebuild_tensor_v2")


def tensor(storage: Storage, offset: int, size: tuple, stride: tuple | None = None, state=None):
    """What torch's Tensor.__reduce_ex__ produces for a plain CPU tensor."""
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    return Reduce(REBUILD_V2, (storage, offset, tuple(size), tuple(stride), False, OrderedDict()), state)


def dense(key: str, array: np.ndarray):
    """A tensor owning a whole storage, in row-major order."""
    return tensor(Storage(key, array.ravel()), 0, array.shape)


class TorchishPickler(pickle._Pickler):
    """pickle's pure-Python pickler, taught to write Global markers and storage persistent ids."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, protocol: int, layout: str):
        super().__init__(file, protocol)
        self.layout = layout
        self.storages: dict[str, Storage] = {}

    def save_global_marker(self, obj: Global) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[Global] = save_global_marker

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            self.storages.setdefault(obj.key, obj)
            return obj.pid(self.layout)
        return None


def torch_pickle_bytes(obj, protocol: int = 2, layout: str = "zip") -> tuple[bytes, dict]:
    buf = io.BytesIO()
    pickler = TorchishPickler(buf, protocol, layout)
    pickler.dump(obj)
    return buf.getvalue(), pickler.storages


def zip_bytes(obj=None, *, protocol=2, folder="archive", byteorder=b"little", data_pkl=None,
              storages=None, extra=()) -> bytes:
    """torch >= 1.6 layout. ``data_pkl``/``storages`` override what pickling ``obj`` gives."""
    if data_pkl is None:
        data_pkl, found = torch_pickle_bytes(obj, protocol, "zip")
        storages = found if storages is None else storages
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{folder}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{folder}/byteorder", byteorder)
        for key, storage in (storages or {}).items():
            zf.writestr(f"{folder}/data/{key}", storage.raw if isinstance(storage, Storage) else storage)
        zf.writestr(f"{folder}/version", b"3\n")
        for name, data in extra:
            zf.writestr(name, data)
    return buf.getvalue()


def legacy_bytes(obj=None, *, protocol=2, main_pkl=None, storages=None, keys=None, counts=None) -> bytes:
    """The pre-1.6 layout: magic, version, sys_info, main pickle, key list, (count, bytes) records."""
    if main_pkl is None:
        main_pkl, found = torch_pickle_bytes(obj, protocol, "legacy")
        storages = found if storages is None else storages
    storages = storages or {}
    keys = sorted(storages) if keys is None else keys
    counts = counts or {}
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    out = io.BytesIO()
    for header in (MAGIC, 1001, sys_info):
        pickle.dump(header, out, protocol=2)
    out.write(main_pkl)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        storage = storages[key]
        out.write(struct.pack("<q", counts.get(key, storage.numel)))
        out.write(storage.raw)
    return out.getvalue()


def checkpoint_bytes(layout: str, obj, protocol: int = 2) -> bytes:
    return zip_bytes(obj, protocol=protocol) if layout == "zip" else legacy_bytes(obj, protocol=protocol)


def write(tmp_path: Path, data: bytes, name: str = "pytorch_model.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def save(tmp_path: Path, layout: str, obj, protocol: int = 2) -> Path:
    return write(tmp_path, checkpoint_bytes(layout, obj, protocol))


def raw_pickle(layout: str, pkl: bytes) -> bytes:
    """A hand-written pickle put where the main pickle goes, with no storages."""
    return zip_bytes(data_pkl=pkl) if layout == "zip" else legacy_bytes(main_pkl=pkl)


def assert_one_line_error(exc_info, path: Path) -> str:
    message = str(exc_info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_matrix_round_trip(tmp_path, layout, protocol):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5 - 1
    b = np.linspace(-3, 3, 5, dtype=np.float32)
    state = OrderedDict([("layer.weight", dense("0", a)), ("layer.bias", dense("1", b))])
    out = load_torch_checkpoint(save(tmp_path, layout, state, protocol))
    assert list(out) == ["layer.weight", "layer.bias"]
    np.testing.assert_array_equal(out["layer.weight"], a)
    np.testing.assert_array_equal(out["layer.bias"], b)
    assert out["layer.weight"].dtype == np.float32 and out["layer.weight"].flags.c_contiguous


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_transposed_tensor(tmp_path, layout):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"t": tensor(Storage("0", base.ravel()), 0, (4, 3), (1, 4)),
             "every_other": tensor(Storage("0", base.ravel()), 1, (2, 3), (6, 2))}
    out = load_torch_checkpoint(save(tmp_path, layout, state))
    np.testing.assert_array_equal(out["t"], base.T)
    assert out["t"].flags.c_contiguous
    np.testing.assert_array_equal(out["every_other"], np.array([[1, 3, 5], [7, 9, 11]], np.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_storage_with_offsets_gives_independent_arrays(tmp_path, layout):
    flat = np.arange(10, dtype=np.float32)
    shared = Storage("7", flat)
    state = {"head": tensor(shared, 0, (4,)), "tail": tensor(shared, 4, (2, 3)),
             "tied": tensor(shared, 0, (4,))}
    out = load_torch_checkpoint(save(tmp_path, layout, state))
    np.testing.assert_array_equal(out["head"], flat[:4])
    np.testing.assert_array_equal(out["tail"], flat[4:].reshape(2, 3))
    np.testing.assert_array_equal(out["tied"], flat[:4])
    out["head"][0] = 99
    assert out["tied"][0] == 0 and out["head"].flags.writeable


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.int32, np.int16,
                                   np.int8, np.uint8, np.bool_])
def test_dtypes_round_trip(tmp_path, layout, dtype):
    a = (np.arange(-6, 6).reshape(3, 4) % 3 == 0) if dtype is np.bool_ else \
        np.arange(-6, 6).reshape(3, 4).astype(dtype)
    out = load_torch_checkpoint(save(tmp_path, layout, {"x": dense("0", a)}))
    assert out["x"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["x"], a)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_becomes_float32(tmp_path, layout):
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 2.0 ** 100, 2.0 ** -130], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: these have empty low halves
    assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), values)
    state = {"w": tensor(Storage("0", bits.tobytes(), "BFloat16Storage", bits.size), 0, (2, 4))}
    out = load_torch_checkpoint(save(tmp_path, layout, state))
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], values.reshape(2, 4))


def test_big_endian_zip(tmp_path):
    a = np.arange(6, dtype=np.float32) / 7
    storage = Storage("0", a.astype(">f4").tobytes(), "FloatStorage", 6)
    data = zip_bytes({"w": tensor(storage, 0, (2, 3))}, byteorder=b"big")
    out = load_torch_checkpoint(write(tmp_path, data))
    np.testing.assert_array_equal(out["w"], a.reshape(2, 3))
    assert out["w"].dtype == np.dtype("=f4")


def test_zip_without_byteorder_and_custom_folder(tmp_path):
    a = np.ones((2, 2), dtype=np.float32)
    data = zip_bytes({"w": dense("0", a)}, folder="pytorch_model", byteorder=None)
    np.testing.assert_array_equal(load_torch_checkpoint(write(tmp_path, data))["w"], a)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scalar_and_empty_tensors(tmp_path, layout):
    state = {"scale": tensor(Storage("0", np.array([2.5], np.float32)), 0, ()),
             "empty": tensor(Storage("1", np.zeros(0, np.float32)), 0, (0, 3))}
    out = load_torch_checkpoint(save(tmp_path, layout, state))
    assert out["scale"].shape == () and out["scale"] == np.float32(2.5)
    assert out["empty"].shape == (0, 3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_metadata_and_wrappers(tmp_path, layout):
    """model.state_dict() carries a ``_metadata`` attribute: pickled as BUILD on the OrderedDict."""
    a = np.arange(4, dtype=np.float32)
    inner = OrderedDict([("w", dense("0", a)), ("num_batches", 3)])
    inner._metadata = OrderedDict([("", {"version": 1})])
    for obj in (inner, {"state_dict": inner, "epoch": 2},
                {"epoch": 5, "model": inner, "optimizer": {"lr": 0.1}, "note": "x"}):
        out = load_torch_checkpoint(save(tmp_path, layout, obj))
        assert list(out) == ["w"]
        np.testing.assert_array_equal(out["w"], a)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameter_and_rebuild_from_type(tmp_path, layout):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    param = Reduce(Global("torch._utils", "_rebuild_parameter"), (dense("0", a), True, OrderedDict()))
    with_state = Reduce(Global("torch._utils", "_rebuild_parameter_with_state"),
                        (dense("1", a), True, OrderedDict(), {"tag": "x"}))
    typed = Reduce(Global("torch._tensor", "_rebuild_from_type_v2"),
                   (REBUILD_V2, Global("torch", "Tensor"),
                    (Storage("2", a.ravel()), 0, (2, 3), (3, 1), False, OrderedDict()), {"attr": 1}))
    out = load_torch_checkpoint(save(tmp_path, layout, {"p": param, "q": with_state, "r": typed}))
    for name in "pqr":
        np.testing.assert_array_equal(out[name], a)


def test_legacy_storage_views(tmp_path):
    flat = np.arange(10, dtype=np.int64)
    view = Storage("root", flat, view=("v1", 3, 5))
    data = legacy_bytes({"v": tensor(view, 1, (2, 2))}, storages={"root": Storage("root", flat)})
    out = load_torch_checkpoint(write(tmp_path, data))
    np.testing.assert_array_equal(out["v"], flat[4:8].reshape(2, 2))


def test_old_rebuild_tensor(tmp_path):
    a = np.arange(3, dtype=np.float32)
    old = Reduce(Global("torch._utils", "_rebuild_tensor"), (Storage("0", a), 0, (3,), (1,)))
    np.testing.assert_array_equal(load_torch_checkpoint(save(tmp_path, "zip", {"w": old}))["w"], a)


def test_accepts_str_and_pathlike_and_never_imports_torch(tmp_path):
    path = save(tmp_path, "zip", {"w": dense("0", np.ones(2, np.float32))})
    assert load_torch_checkpoint(str(path)).keys() == load_torch_checkpoint(path).keys()
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)


# --- not a state dict ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("obj, needle", [
    ([1, 2], "not a state dict"),
    ({"epoch": 3, "lr": 0.1}, "no tensors"),
    ({1: "x"}, "no tensors"),
])
def test_not_a_state_dict(tmp_path, layout, obj, needle):
    path = save(tmp_path, layout, obj)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_torch_checkpoint(path)
    assert_one_line_error(e, path)


def test_non_string_key_with_tensor(tmp_path):
    path = save(tmp_path, "zip", {3: dense("0", np.ones(2, np.float32))})
    with pytest.raises(CheckpointError, match="key is a int"):
        load_torch_checkpoint(path)


# --- malicious pickles ------------------------------------------------------------------------

def shell_payloads(marker: Path) -> dict[str, object]:
    """Each would create ``marker`` if it ever ran; value: (payload, refused global in message)."""
    touch = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    importer = Reduce(Global("builtins", "__import__"), ("os",))
    return {
        "os.system": (Reduce(Global("os", "system"), (touch,)), "os.system"),
        "posix.system": (Reduce(Global("posix", "system"), (touch,)), "posix.system"),
        "nt.system": (Reduce(Global("nt", "system"), (touch,)), "nt.system"),
        "subprocess.Popen": (Reduce(Global("subprocess", "Popen"), (["touch", str(marker)],)),
                             "subprocess.Popen"),
        "builtins.eval": (Reduce(Global("builtins", "eval"), (py,)), "builtins.eval"),
        "builtins.exec": (Reduce(Global("builtins", "exec"), (py,)), "builtins.exec"),
        "__builtin__.eval": (Reduce(Global("__builtin__", "eval"), (py,)), "__builtin__.eval"),
        "builtins.getattr": (Reduce(Reduce(Global("builtins", "getattr"), (importer, "system")), (touch,)),
                             "builtins.getattr"),
        "torch._utils.os": (Reduce(Global("torch._utils.os", "system"), (touch,)), "torch._utils.os.system"),
        "torch._utils os.system": (Reduce(Global("torch._utils", "os.system"), (touch,)),
                                   "torch._utils.os.system"),
        "torch.._utils": (Reduce(Global("torch.._utils", "_rebuild_tensor_v2"), (touch,)),
                          "torch.._utils._rebuild_tensor_v2"),
        "OrderedDict.__class__": (Reduce(Global("collections", "OrderedDict.__class__"), (touch,)),
                                  "collections.OrderedDict.__class__"),
        "rebuild.__globals__": (Reduce(Global("torch._utils", "_rebuild_tensor_v2.__globals__"), (touch,)),
                                "torch._utils._rebuild_tensor_v2.__globals__"),
        "FloatStorage.__init__": (Reduce(Global("torch", "FloatStorage.__init__"), (touch,)),
                                  "torch.FloatStorage.__init__"),
        "trailing space": (Reduce(Global("torch._utils ", "_rebuild_tensor_v2"), (touch,)),
                           "torch._utils ._rebuild_tensor_v2"),
        "copyreg._reconstructor": (Reduce(Global("copyreg", "_reconstructor"), (touch,)),
                                   "copyreg._reconstructor"),
        "numpy._reconstruct": (Reduce(Global("numpy.core.multiarray", "_reconstruct"), (touch,)),
                               "numpy.core.multiarray._reconstruct"),
    }


PAYLOAD_NAMES = list(shell_payloads(Path("m")))


def assert_refused(path: Path, marker: Path, refused: str | None = None) -> str:
    with pytest.raises(UnsafePickleError) as e:
        load_torch_checkpoint(path)
    message = assert_one_line_error(e, path)
    if refused is not None:
        assert f"refused to load global {refused!r}" in message
    assert not marker.exists()
    return message


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_malicious_globals_are_refused(tmp_path, name, layout, protocol):
    marker = tmp_path / "pwned"
    payload, refused = shell_payloads(marker)[name]
    state = OrderedDict([("w", dense("0", np.ones(2, np.float32))), ("evil", payload)])
    path = save(tmp_path, layout, state, protocol)
    assert_refused(path, marker, refused)


def test_refusal_message_format(tmp_path):
    payload, _ = shell_payloads(tmp_path / "pwned")["os.system"]
    path = save(tmp_path, "zip", {"evil": payload})
    with pytest.raises(UnsafePickleError) as e:
        load_torch_checkpoint(path)
    assert str(e.value) == (f"{path}: refused to load global 'os.system' "
                            "(only tensors and state dicts are allowed)")
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)


class EvilReduce:
    """The classic: any class whose __reduce__ names a dangerous callable."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Plain:
    """A plain object: protocols 0/1 pickle it through copyreg._reconstructor."""

    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_reduce_classes_every_protocol(tmp_path, layout, protocol):
    marker = tmp_path / "pwned"
    pkl = pickle.dumps({"evil": EvilReduce(marker)}, protocol=protocol)
    path = write(tmp_path, raw_pickle(layout, pkl))
    assert_refused(path, marker, f"{os.system.__module__}.system")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("protocol", [0, 1])
def test_copyreg_reconstructor_refused(tmp_path, layout, protocol):
    """Protocols 0/1 write the Python 2 spelling copy_reg, which must not be mapped and allowed."""
    path = write(tmp_path, raw_pickle(layout, pickle.dumps({"p": Plain()}, protocol=protocol)))
    assert_refused(path, tmp_path / "never", "copy_reg._reconstructor")


def opcode_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Hand-written opcode streams that reach a global without the usual GLOBAL+REDUCE shape."""
    cmd = f"touch {marker}".encode()
    short = lambda s: pickle.SHORT_BINUNICODE + bytes([len(s)]) + s  # noqa: E731
    return {
        # STACK_GLOBAL with module and name fetched back from the memo
        "stack_global_memo": (
            b"\x80\x04" + short(b"os") + pickle.MEMOIZE + short(b"system") + pickle.MEMOIZE
            + pickle.POP + pickle.POP + pickle.BINGET + b"\x00" + pickle.BINGET + b"\x01"
            + pickle.STACK_GLOBAL + short(cmd) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
            "os.system"),
        "proto0_global": (b"cposix\nsystem\n(S'" + cmd + b"'\ntR.", "posix.system"),
        "newobj": (b"\x80\x02csubprocess\nPopen\n]" + short(b"touch") + b"a" + short(str(marker).encode())
                   + b"a\x85\x81.", "subprocess.Popen"),
        "newline_in_name": (b"\x80\x04" + short(b"os\nsystem") + short(b"sys\ntem") + pickle.STACK_GLOBAL
                            + pickle.STOP, "os system.sys tem"),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(opcode_payloads(Path("m"))))
def test_opcode_level_payloads(tmp_path, layout, name):
    marker = tmp_path / "pwned"
    pkl, refused = opcode_payloads(marker)[name]
    path = write(tmp_path, raw_pickle(layout, pkl))
    assert_refused(path, marker, refused)


def refused_opcode_payloads(marker: Path) -> dict[str, bytes]:
    """Opcodes torch.save never writes: refused before the unpickler runs at all."""
    cmd = f"touch {marker}".encode()
    return {
        "INST": b"(S'" + cmd + b"'\nios\nsystem\n.",
        "OBJ": b"(cos\nsystem\nS'" + cmd + b"'\no.",
        "EXT1": b"\x80\x02\x82\xf1X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
        "EXT2": b"\x80\x02\x83\xf1\x00X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
        "BYTEARRAY8": b"\x80\x05\x96" + struct.pack("<Q", 3) + b"abc.",
        "NEXT_BUFFER": b"\x80\x05\x97.",
        "READONLY_BUFFER": b"\x80\x05C\x01x\x98.",
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opcode", list(refused_opcode_payloads(Path("m"))))
def test_refused_opcodes(tmp_path, capfd, layout, opcode):
    marker = tmp_path / "pwned"
    code = 0xF1
    copyreg.add_extension("os", "system", code)  # so EXT1/EXT2 would resolve to os.system
    try:
        path = write(tmp_path, raw_pickle(layout, refused_opcode_payloads(marker)[opcode]))
        message = assert_refused(path, marker)
    finally:
        copyreg.remove_extension("os", "system", code)
    assert f"refused pickle opcode {opcode}" in message
    assert "SystemError" not in capfd.readouterr().err


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opcode", [b"\x8e", b"\x8d", b"\x96", b"B", b"T"])  # ...8 and 4-byte lengths
def test_huge_length_fields_fail_as_damage(tmp_path, capfd, layout, opcode):
    """A length claiming far more bytes than the file holds is damage, not an allocation.

    A truncated BYTEARRAY8 given to CPython's unpickler frees a bytearray with an exported
    buffer ("SystemError: deallocated bytearray object has exported buffers"); it must never
    get that far.
    """
    width = 8 if opcode in (b"\x8e", b"\x8d", b"\x96") else 4
    pkl = b"\x80\x04" + opcode + (2 ** (8 * width - 2)).to_bytes(width, "little") + b"abc"
    path = write(tmp_path, raw_pickle(layout, pkl))
    with pytest.raises(CheckpointError, match="damaged pickle") as e:
        load_torch_checkpoint(path)
    assert_one_line_error(e, path)
    assert "SystemError" not in capfd.readouterr().err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_build_on_tensor_is_refused(tmp_path, layout):
    a = np.ones(2, np.float32)
    state = {"w": tensor(Storage("0", a), 0, (2,), state={"storage": 5})}
    with pytest.raises(UnsafePickleError, match="refused to set state"):
        load_torch_checkpoint(save(tmp_path, layout, state))


@pytest.mark.parametrize("target", [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n",
                                    b"ccollections\nOrderedDict\n"])
def test_build_cannot_rewrite_allowed_globals(tmp_path, target):
    """(None, {'__defaults__': (1,)}) slot-state would setattr on the stand-in if BUILD reached it."""
    before = torch_pickle._rebuild_tensor_v2.__defaults__
    for state in (b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b.", b"}X\x05\x00\x00\x00dtypeK\x01sb."):
        path = write(tmp_path, raw_pickle("zip", b"\x80\x02" + target + state))
        with pytest.raises(UnsafePickleError, match="refused to set state"):
            load_torch_checkpoint(path)
    assert torch_pickle._rebuild_tensor_v2.__defaults__ == before
    assert torch_pickle.ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == np.float32


# --- persistent ids -----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("container, needle", [
    (Global("torch.nn.modules.linear", "Linear"), "global 'torch.nn.modules.linear.Linear'"),
    ("Linear", "nn.Module"),
])
def test_pickled_module_persistent_id_refused(tmp_path, layout, container, needle):
    """torch.save(model) stores ('module', class, source file, source): never a state dict."""
    class Module:
        pass

    class P(TorchishPickler):
        def persistent_id(self, obj):
            return ("module", container, "f.py", "src") if isinstance(obj, Module) \
                else super().persistent_id(obj)

    buf = io.BytesIO()
    P(buf, 2, layout).dump({"m": Module()})
    path = write(tmp_path, raw_pickle(layout, buf.getvalue()))
    with pytest.raises(UnsafePickleError, match=needle):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_string_persistent_id_refused(tmp_path, layout):
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_torch_checkpoint(write(tmp_path, raw_pickle(layout, b"P0\n.")))


@pytest.mark.parametrize("pid, needle", [
    (("storage", Global("torch", "FloatStorage"), "0", "cpu"), "fields"),
    (("storage", Global("collections", "OrderedDict"), "0", "cpu", 2), "not a torch storage"),
    (("storage", Global("torch", "FloatStorage"), "../../etc/passwd", "cpu", 2), "invalid storage key"),
    (("storage", Global("torch", "FloatStorage"), 0, "cpu", 2), "invalid storage key"),
    (("storage", Global("torch", "FloatStorage"), "0", "cpu", -1), "invalid element count"),
    (("blob", Global("torch", "FloatStorage"), "0", "cpu", 2), "persistent id"),
])
def test_malformed_zip_persistent_ids(tmp_path, pid, needle):
    class P(TorchishPickler):
        def persistent_id(self, obj):
            return pid if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    P(buf, 2, "zip").dump({"w": tensor(Storage("0", np.ones(2, np.float32)), 0, (2,))})
    storages = {"0": np.ones(2, np.float32).tobytes()}
    path = write(tmp_path, zip_bytes(data_pkl=buf.getvalue(), storages=storages))
    with pytest.raises(CheckpointError, match=needle) as e:
        load_torch_checkpoint(path)
    assert_one_line_error(e, path)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset, size, stride", [
    (7, (4,), (1,)),            # offset + size past the end
    (0, (11,), (1,)),           # one element too many
    (10, (1,), (1,)),           # offset at the end
    (0, (2, 2), (9, 1)),        # stride walks off the end
    (0, (10 ** 12,), (0,)),     # zero stride: tiny storage, absurd size
    (2 ** 70, (1,), (1,)),      # offset overflows int64
    (-1, (2,), (1,)),           # negative offset
    (0, (2,), (-1,)),           # negative stride
    (0, (2, 2), (1,)),          # size/stride length mismatch
    (0, (2.0,), (1,)),          # float size
])
def test_tensor_outside_its_storage(tmp_path, layout, offset, size, stride):
    state = {"enc.weight": tensor(Storage("0", np.arange(10, dtype=np.float32)), offset, size, stride)}
    path = save(tmp_path, layout, state)
    with pytest.raises(CheckpointError) as e:
        load_torch_checkpoint(path)
    assert_one_line_error(e, path)


def test_out_of_range_error_names_the_tensor(tmp_path):
    state = {"enc.weight": tensor(Storage("0", np.arange(4, dtype=np.float32)), 2, (3,))}
    path = save(tmp_path, "zip", state)
    with pytest.raises(CheckpointError, match="tensor 'enc.weight'.*does not fit"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_key_declared_twice_differently(tmp_path, layout):
    a = np.ones(4, np.float32)
    state = {"a": tensor(Storage("0", a), 0, (4,)), "b": tensor(Storage("0", a, numel=8), 0, (4,))}
    with pytest.raises(CheckpointError, match="declared twice"):
        load_torch_checkpoint(save(tmp_path, layout, state))


def test_legacy_view_out_of_range(tmp_path):
    flat = np.arange(10, dtype=np.int64)
    view = Storage("root", flat, view=("v1", 8, 5))
    data = legacy_bytes({"v": tensor(view, 0, (2,))}, storages={"root": Storage("root", flat)})
    with pytest.raises(CheckpointError, match="out of range"):
        load_torch_checkpoint(write(tmp_path, data))


# --- zip structure ------------------------------------------------------------------------------

def valid_state():
    return {"w": dense("0", np.arange(6, dtype=np.float32).reshape(2, 3))}


@pytest.mark.parametrize("member", ["../evil", "archive/../../evil", "/abs/evil", "archive/data/..",
                                    "C:\\evil", "archive\\..\\evil", "c:/evil"])
def test_zip_unsafe_member_names(tmp_path, member):
    path = write(tmp_path, zip_bytes(valid_state(), extra=[(member, b"x")]))
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(UnsafePickleError, match="unsafe path") as e:
        load_torch_checkpoint(path)
    assert_one_line_error(e, path)
    assert set(tmp_path.parent.rglob("*")) == before


@pytest.mark.parametrize("delta", [-4, -1, 1, 4])
def test_zip_storage_of_wrong_size(tmp_path, delta):
    a = np.arange(6, dtype=np.float32)
    raw = a.tobytes()
    raw = raw[:delta] if delta < 0 else raw + b"\0" * delta
    path = write(tmp_path, zip_bytes({"w": dense("0", a)}, storages={"0": raw}))
    with pytest.raises(CheckpointError, match="archive/data/0 holds") as e:
        load_torch_checkpoint(path)
    assert_one_line_error(e, path)


def test_zip_missing_storage(tmp_path):
    path = write(tmp_path, zip_bytes(valid_state(), storages={}))
    with pytest.raises(CheckpointError, match="missing"):
        load_torch_checkpoint(path)


def test_zip_unused_storages_are_not_read(tmp_path):
    """Optimizer state next to the model is never materialized, even if its storage is absent."""
    obj = {"model": valid_state(), "optimizer": {"m": dense("9", np.ones(3, np.float32))}}
    data_pkl, storages = torch_pickle_bytes(obj)
    del storages["9"]
    out = load_torch_checkpoint(write(tmp_path, zip_bytes(data_pkl=data_pkl, storages=storages)))
    assert list(out) == ["w"]


@pytest.mark.parametrize("build, needle", [
    (lambda zf: zf.writestr("archive/other.txt", b"x"), "data.pkl"),
    (lambda zf: (zf.writestr("a/data.pkl", b"N."), zf.writestr("b/data.pkl", b"N.")), "found 2"),
    (lambda zf: zf.writestr("x/y/data.pkl", b"N."), "data.pkl"),
    (lambda zf: (zf.writestr("m/data.pkl", b"N."), zf.writestr("m/constants.pkl", b"N.")), "TorchScript"),
    (lambda zf: (zf.writestr("a/data.pkl", b"N."), zf.writestr("a/byteorder", b"middle")), "byte order"),
])
def test_zip_structure_errors(tmp_path, build, needle):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        build(zf)
    path = write(tmp_path, buf.getvalue())
    with pytest.raises(CheckpointError, match=needle) as e:
        load_torch_checkpoint(path)
    assert_one_line_error(e, path)


def test_zip_duplicate_members(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = zip_bytes(valid_state(), extra=[("archive/data/0", b"\0" * 24)])
    with pytest.raises(CheckpointError, match="duplicate"):
        load_torch_checkpoint(write(tmp_path, data))


def test_zip_oversized_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", 16)
    with pytest.raises(CheckpointError, match="more than the 16 allowed"):
        load_torch_checkpoint(save(tmp_path, "zip", valid_state()))


def test_deflated_zip_is_fine(tmp_path):
    data_pkl, storages = torch_pickle_bytes(valid_state())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/data/0", storages["0"].raw)
    out = load_torch_checkpoint(write(tmp_path, buf.getvalue()))
    np.testing.assert_array_equal(out["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


# --- legacy structure ---------------------------------------------------------------------------

def test_legacy_count_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match="holds 7 elements"):
        load_torch_checkpoint(write(tmp_path, legacy_bytes(valid_state(), counts={"0": 7})))


def test_legacy_huge_count_is_not_read(tmp_path):
    a = np.arange(6, dtype=np.float32)
    storages = {"0": Storage("0", a, numel=2 ** 40)}
    data = legacy_bytes({"w": tensor(storages["0"], 0, (6,))}, storages=storages)
    with pytest.raises(CheckpointError, match="truncated"):
        load_torch_checkpoint(write(tmp_path, data))


def test_legacy_missing_and_unused_storage_keys(tmp_path):
    with pytest.raises(CheckpointError, match="missing from the file"):
        load_torch_checkpoint(write(tmp_path, legacy_bytes(valid_state(), keys=[])))
    storages = {"0": Storage("0", np.ones(6, np.float32)), "z": Storage("z", np.ones(1, np.float32))}
    data = legacy_bytes(valid_state(), storages=storages)
    with pytest.raises(CheckpointError, match="never used"):
        load_torch_checkpoint(write(tmp_path, data))


@pytest.mark.parametrize("header, needle", [
    ([12345, 1001], "magic number"),
    ([MAGIC, 999], "protocol version 999"),
])
def test_legacy_bad_header(tmp_path, header, needle):
    data = b"".join(pickle.dumps(h, protocol=2) for h in header) + pickle.dumps({}, protocol=2)
    with pytest.raises(CheckpointError, match=needle):
        load_torch_checkpoint(write(tmp_path, data))


def test_legacy_header_pickles_allow_no_globals(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(EvilReduce(marker), protocol=2)
    assert_refused(write(tmp_path, data), marker)


# --- garbage in -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_files(tmp_path, layout):
    data = checkpoint_bytes(layout, valid_state())
    for cut in sorted({0, 1, 4, 10, 30, len(data) // 2, len(data) - 30, len(data) - 1}):
        path = write(tmp_path, data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_torch_checkpoint(path)
        assert_one_line_error(e, path)


def test_random_bytes_and_odd_inputs(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        path = write(tmp_path, rng.bytes(int(rng.integers(1, 5000))), f"random{i}.bin")
        with pytest.raises(CheckpointError) as e:
            load_torch_checkpoint(path)
        assert_one_line_error(e, path)
    for path in (tmp_path / "missing.bin", tmp_path):
        with pytest.raises(CheckpointError, match=f"^{path}: "):
            load_torch_checkpoint(path)
    tar = bytearray(1024)
    tar[257:262] = b"ustar"
    with pytest.raises(CheckpointError, match="torch < 0.4"):
        load_torch_checkpoint(write(tmp_path, bytes(tar)))


VALID_FILES = {layout: checkpoint_bytes(layout, {
    "a": dense("0", np.arange(12, dtype=np.float32).reshape(3, 4)),
    "b": tensor(Storage("1", np.arange(8, dtype=np.int64)), 2, (2, 2), (1, 3)),
    "c": tensor(Storage("2", (np.arange(4, dtype=np.uint16) + 0x3F80).tobytes(), "BFloat16Storage", 4),
                0, (4,)),
}) for layout in LAYOUTS}


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, insert: bytes) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    if insert:
        at = edits[0][0] % len(out) if edits else 0
        out[at:at] = insert
    return bytes(out[:cut]) if cut is not None else bytes(out)


def load_or_checkpoint_error(path: Path) -> None:
    try:
        result = load_torch_checkpoint(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return
    assert isinstance(result, dict)
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in result.items())


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=3000))
def test_fuzz_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "random.bin"
    path.write_bytes(data)
    load_or_checkpoint_error(path)


@FUZZ
@given(layout=st.sampled_from(LAYOUTS),
       edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.integers(0, 4000),
       insert=st.binary(max_size=16))
def test_fuzz_mutated_valid_files(tmp_path_factory, layout, edits, cut, insert):
    path = tmp_path_factory.mktemp("mutant", numbered=True) / "pytorch_model.bin"
    path.write_bytes(mutate(VALID_FILES[layout], edits, cut, insert))
    load_or_checkpoint_error(path)


# --- end to end: a fixture checkpoint saved as pytorch_model.bin ---------------------------------

@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_torch_pickle_checkpoint_matches_safetensors(tmp_path, layout, monkeypatch):
    """The same weights as a torch pickle instead of model.safetensors: identical hidden states."""
    import shutil

    import ufcpu
    from ufcpu.safetensors_io import open_tensors

    monkeypatch.setenv("UFCPU_CACHE", str(tmp_path / "cache"))
    fixture = Path(__file__).parent / "data" / "tiny-ufb"
    src = tmp_path / "ckpt"
    shutil.copytree(fixture, src, ignore=shutil.ignore_patterns("model.safetensors", "expected.npz"))
    tensors = open_tensors(fixture / "model.safetensors")
    state = OrderedDict((k, dense(str(i), np.array(v))) for i, (k, v) in enumerate(tensors.items()))
    save(src, layout, state)
    via_pickle = ufcpu.load(src).encode(["hello world", "fast feedforward"])
    via_safetensors = ufcpu.load(fixture).encode(["hello world", "fast feedforward"])
    np.testing.assert_array_equal(via_pickle, via_safetensors)
