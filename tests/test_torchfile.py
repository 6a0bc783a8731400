"""vqtool.interop.torchfile: reading torch.save zip files without running anything named in them."""

from __future__ import annotations

import collections
import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from vqtool.errors import VqtoolError
from vqtool.interop.torchfile import Placeholder, placeholder_name, read_torch_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "peer-checkpoints"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"peer checkpoint fixtures absent ({FIXTURES})")


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _error(path) -> str:
    with pytest.raises(VqtoolError) as info:
        read_torch_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def _same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert type(got) is type(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset()
    assert got.device.type == "cpu" and got.requires_grad == want.requires_grad
    assert torch.equal(got, want)


# ---------------------------------------------------------------- round trips


def test_round_trip_keeps_dtypes_geometry_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    state = collections.OrderedDict(
        f32=torch.randn(3, 4),
        f16=torch.randn(5).half(),
        i64=torch.arange(7) - 3,
        flags=torch.tensor([True, False, True]),
        bf16=torch.randn(2, 3).bfloat16(),
        whole=base.view(4, 6),
        tail=base[12:].view(4, 3),  # same storage as `whole`, offset 12
        transposed=torch.randn(4, 6).t(),
        window=torch.arange(10.0)[3:8],
        empty=torch.empty(0, 5),
        scalar=torch.tensor(2.5),
    )
    got = read_torch_file(_save(state, tmp_path / "state.th"))

    assert type(got) is collections.OrderedDict and list(got) == list(state)
    for key, want in state.items():
        _same_tensor(got[key], want)
    assert not got["transposed"].is_contiguous() and got["window"].storage_offset() == 3
    whole, tail = got["whole"], got["tail"]
    assert whole.untyped_storage().data_ptr() == tail.untyped_storage().data_ptr()
    whole[2, 0] = 100.0  # element 12: the first of `tail`
    assert tail[0, 0].item() == 100.0
    assert got["f32"].untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.float8_e4m3fn, torch.complex64, torch.float64, torch.int8])
def test_dtypes_without_a_typed_storage_class(tmp_path, dtype):
    # uint16 and float8 are written as UntypedStorage + _rebuild_tensor_v3
    want = (torch.arange(12, dtype=torch.float32).view(3, 4) * 3).to(dtype)
    got = read_torch_file(_save({"t": want}, tmp_path / "t.th"))["t"]
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_conjugate_bit_is_restored(tmp_path):
    want = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj()
    got = read_torch_file(_save({"c": want}, tmp_path / "c.th"))["c"]
    assert got.is_conj() and torch.equal(got, want)


def test_nested_containers_and_parameters(tmp_path):
    weight = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    obj = {
        "config": {"lr": 1e-4, "layers": [1, 2, (3, "x")], "name": "model", "none": None, "on": True},
        "weight": weight,
        "frozen": frozen,
        "pair": (torch.ones(2, dtype=torch.int32), [torch.zeros(1)]),
        "misc": {"set": {1, 2}, "frozenset": frozenset("ab"), "bytes": b"\x00\xff", "empty": b"", "c": 1 + 2j},
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
    }
    got = read_torch_file(_save(obj, tmp_path / "nested.th"))

    assert got["config"] == obj["config"]
    assert isinstance(got["weight"], torch.nn.Parameter) and got["weight"].requires_grad
    assert torch.equal(got["weight"], weight)
    assert isinstance(got["frozen"], torch.nn.Parameter) and not got["frozen"].requires_grad
    assert isinstance(got["pair"], tuple) and torch.equal(got["pair"][0], obj["pair"][0])
    assert got["pair"][0].dtype == torch.int32 and torch.equal(got["pair"][1][0], torch.zeros(1))
    assert got["misc"]["set"] == {1, 2} and got["misc"]["frozenset"] == frozenset("ab")
    assert got["misc"]["c"] == 1 + 2j and got["misc"]["empty"] == b""
    # non-empty bytes are pickled as _codecs.encode(...), which stays a placeholder
    assert placeholder_name(got["misc"]["bytes"]) == "_codecs.encode"
    assert got["dtype"] is torch.float16 and got["size"] == torch.Size([2, 3]) and got["device"] == torch.device("cpu")


def test_tensor_with_python_attributes_comes_back_plain(tmp_path):
    tensor = torch.arange(4.0)
    tensor.note = "hello"  # pickled through torch._tensor._rebuild_from_type_v2
    got = read_torch_file(_save({"t": tensor}, tmp_path / "t.th"))["t"]
    assert type(got) is torch.Tensor and torch.equal(got, tensor) and not hasattr(got, "note")


# ---------------------------------------------------------------- placeholders

_MODULE = textwrap.dedent('''
    import pathlib

    pathlib.Path(__file__).with_name("imported.flag").touch()

    class Thing:
        def __init__(self, n, weights):
            self.n = n
            self.weights = weights

    def make(a, b):
        return (a, b)

    class Made:
        def __reduce__(self):
            return (make, (1, "two"))
''')


@pytest.mark.parametrize("importable", [False, True], ids=["gone", "still-importable"])
def test_unknown_classes_become_placeholders_and_are_not_imported(tmp_path, importable):
    name = f"vqtool_tmp_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        module = __import__(name)
        weights = torch.randn(2, 2)
        path = _save({"thing": module.Thing(3, weights), "made": module.Made(), "w": weights}, tmp_path / "obj.th")
    finally:
        del sys.modules[name]
        if not importable:
            sys.path.remove(str(tmp_path))
    flag = tmp_path / "imported.flag"
    flag.unlink()
    try:
        got = read_torch_file(path)
    finally:
        if importable:
            sys.path.remove(str(tmp_path))
    assert name not in sys.modules and not flag.exists()

    thing, made = got["thing"], got["made"]
    assert isinstance(thing, Placeholder) and placeholder_name(thing) == f"{name}.Thing"
    assert placeholder_name(type(thing)) == f"{name}.Thing" and f"{name}.Thing" in repr(thing)
    assert thing.state["n"] == 3 and torch.equal(thing.state["weights"], weights)
    assert thing.state["weights"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()
    assert placeholder_name(made) == f"{name}.make" and made.args == (1, "two")
    assert placeholder_name(got["w"]) is None and placeholder_name(Placeholder) is None

    # the placeholder class is inert: calling it, __new__, __setstate__ only record
    cls = type(thing)
    called = cls(1, key="v")
    assert called.args == (1,) and called.kwargs == {"key": "v"}
    fresh = cls.__new__(cls, 5)
    fresh.__setstate__({"a": 1})
    assert fresh.args == (5,) and fresh.state == {"a": 1}
    with pytest.raises(AttributeError):
        cls.__setstate__ = print  # shared by every file naming it, so read-only

    # and copyable / picklable, keeping name and record
    for clone in (copy.deepcopy(got), pickle.loads(pickle.dumps(got))):
        assert placeholder_name(clone["thing"]) == f"{name}.Thing" and clone["thing"].state["n"] == 3
        assert clone["made"].args == (1, "two")
    assert name not in sys.modules


# ---------------------------------------------------------------- refusals


class _Payload:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(sentinel: Path):
    return {
        "os.system": (os.system, (f"touch {sentinel}",)),
        "builtins.eval": (eval, (f"__import__('pathlib').Path({str(sentinel)!r}).touch()",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(sentinel)],)),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_code_running_pickles_are_refused_before_running(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    fn, args = _payloads(sentinel)[kind]
    path = _save({"w": torch.zeros(2), "x": _Payload(fn, args)}, tmp_path / "evil.th")

    message = _error(path)
    assert "refusing to read" in message
    assert kind in message or (kind == "os.system" and "posix.system" in message)
    assert not sentinel.exists()

    # control: a plain unpickler does run it, so the refusal above is what kept the sentinel away
    loaded = torch.load(path, weights_only=False)
    if isinstance(loaded["x"], subprocess.Popen):
        loaded["x"].wait()
    assert sentinel.exists()


def test_torch_functions_are_refused(tmp_path):
    path = _save({"x": _Payload(torch.load, ("elsewhere.th",))}, tmp_path / "evil.th")
    assert "torch.serialization.load" in _error(path)


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning")
def test_unsupported_tensor_kinds_are_refused(tmp_path):
    quantized = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.quint8)
    message = _error(_save({"q": quantized}, tmp_path / "q.th"))
    assert "_rebuild_qtensor" in message and "kind of tensor" in message


# ---------------------------------------------------------------- hand-made archives


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _PersistentId:
    def __init__(self, pid):
        self.pid = pid


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        if isinstance(obj, _PersistentId):
            return obj.pid
        return None


def _pickle(obj) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def _archive(path: Path, pickled: bytes, storages: dict[str, bytes], byteorder: bytes | None = b"little",
             compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("blob/data.pkl", pickled)
        if byteorder is not None:
            zf.writestr("blob/byteorder", byteorder)
        for key, data in storages.items():
            zf.writestr(f"blob/data/{key}", data)
        zf.writestr("blob/version", b"3\n")
    return path


_FOUR_FLOATS = torch.arange(4, dtype=torch.float32).numpy().tobytes()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_hand_made_archive_reads(tmp_path, compression):
    # the control for the hand-made archives below; a compressed entry takes the zipfile path
    pickled = _pickle({"t": _Tensor(_Storage("0", 4), 1, (3,), (1,))})
    got = read_torch_file(_archive(tmp_path / "ok.th", pickled, {"0": _FOUR_FLOATS}, byteorder=None,
                                   compression=compression))
    assert torch.equal(got["t"], torch.tensor([1.0, 2.0, 3.0]))


def test_tensor_outside_its_storage_is_an_error(tmp_path):
    # Tensor.set_ would silently grow the storage: the reader must check the geometry itself
    for size, offset in (((5,), 0), ((3,), 2), ((0,), 9)):
        pickled = _pickle({"t": _Tensor(_Storage("0", 4), offset, size, (1,))})
        assert "reaches byte" in _error(_archive(tmp_path / "big.th", pickled, {"0": _FOUR_FLOATS}))


def test_storage_larger_than_its_entry_is_an_error(tmp_path):
    pickled = _pickle({"t": _Tensor(_Storage("0", 8), 0, (8,), (1,))})
    assert "corrupt" in _error(_archive(tmp_path / "short.th", pickled, {"0": _FOUR_FLOATS}))


@pytest.mark.parametrize("pid", [("storage", "torch.FloatStorage", "0", "cpu", 4), ("module", "os"), "storage", 7])
def test_other_persistent_ids_are_refused(tmp_path, pid):
    pickled = _pickle({"x": _PersistentId(pid)})
    assert "not a tensor storage" in _error(_archive(tmp_path / "pid.th", pickled, {"0": _FOUR_FLOATS}))


def test_extension_opcodes_are_refused(tmp_path):
    pickled = b"\x80\x02\x82\x01."  # PROTO 2, EXT1 1, STOP
    assert "extension codes" in _error(_archive(tmp_path / "ext.th", pickled, {}))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_refused_whatever_the_pickle_protocol(tmp_path, protocol):
    # protocol 4 names globals with STACK_GLOBAL, 0 and 2 with GLOBAL: both must reach find_class
    sentinel = tmp_path / "SENTINEL"
    pickled = pickle.dumps({"x": _Payload(os.system, (f"touch {sentinel}",))}, protocol=protocol)
    assert (b"\x93" in pickled) == (protocol == 4)  # the STACK_GLOBAL opcode
    assert "os.system" in _error(_archive(tmp_path / "evil.th", pickled, {}))
    assert not sentinel.exists()


@pytest.mark.parametrize("pickled, expected", [
    (b"(S'touch X'\nios\nsystem\n.", "os.system"),  # INST
    (b"c__builtin__\neval\n(S'1'\ntR.", "builtins.eval"),  # Python 2 name
    (b"cbuiltins\ngetattr\n.", "builtins.getattr"),
    (b"ctorch._utils\n_rebuild_tensor_v2.__globals__\n.", "would run code"),
    (b"ctorch\nTensor\n(I3\ntR.", "cannot unpickle"),  # calling a type marker
    (b"ctorch._tensor\n_rebuild_from_type_v2\n(cfoo\nf\nctorch\nTensor\n)NtR.", "cannot unpickle"),
    # BUILD aimed at the reader's own objects, which later files share: they must stay unchanged
    (b"ctorch._utils\n_rebuild_tensor_v2\n(N}S'__defaults__'\n(I1\ntstb.", "read-only"),
    (b"cfoo.bar\nBaz\n(N}S'__call__'\nI1\nstb.", "cannot unpickle"),
], ids=["inst", "py2-eval", "getattr", "dunder-path", "call-marker", "from-type", "build-rebuild", "build-class"])
def test_hostile_pickles(tmp_path, pickled, expected):
    assert expected in _error(_archive(tmp_path / "hostile.th", pickled, {}))
    # nothing was altered for the next file: tensors still rebuild, the placeholder class gained no attribute
    test_hand_made_archive_reads(tmp_path, zipfile.ZIP_STORED)
    cls = read_torch_file(_archive(tmp_path / "class.th", b"cfoo.bar\nBaz\n.", {}))
    assert placeholder_name(cls) == "foo.bar.Baz" and "__call__" not in vars(cls)


def test_big_endian_files_are_refused(tmp_path):
    pickled = _pickle({"t": _Tensor(_Storage("0", 4), 0, (4,), (1,))})
    assert "big-endian" in _error(_archive(tmp_path / "be.th", pickled, {"0": _FOUR_FLOATS}, byteorder=b"big"))


def test_missing_storage_entry_is_an_error(tmp_path):
    pickled = _pickle({"t": _Tensor(_Storage("7", 4), 0, (4,), (1,))})
    assert "blob/data/7" in _error(_archive(tmp_path / "missing.th", pickled, {"0": _FOUR_FLOATS}))


def test_zip_without_data_pkl_is_an_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    assert "data.pkl" in _error(tmp_path / "other.zip")


# ---------------------------------------------------------------- broken files


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.th")
    assert "directory" in _error(tmp_path)


def test_not_a_zip(tmp_path):
    (tmp_path / "text.th").write_text("not a checkpoint\n")
    assert "not a torch.save zip file" in _error(tmp_path / "text.th")
    (tmp_path / "empty.th").write_bytes(b"")
    assert "not a torch.save zip file" in _error(tmp_path / "empty.th")
    legacy = tmp_path / "legacy.th"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    assert "legacy" in _error(legacy)


def test_truncated_and_corrupt_zips(tmp_path):
    path = _save({"w": torch.randn(1000), "v": torch.randn(1000)}, tmp_path / "whole.th")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 40):
        (tmp_path / "cut.th").write_bytes(data[:cut])
        assert "corrupt or truncated" in _error(tmp_path / "cut.th")

    # flip a byte inside the first storage: the CRC must catch it
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("whole/data/0")
    start = info.header_offset + 30 + len(info.filename.encode()) + int.from_bytes(
        data[info.header_offset + 28 : info.header_offset + 30], "little")
    damaged = bytearray(data)
    damaged[start + 100] ^= 0xFF
    (tmp_path / "damaged.th").write_bytes(bytes(damaged))
    assert "CRC" in _error(tmp_path / "damaged.th")


def test_broken_pickle_is_an_error(tmp_path):
    pickled = _pickle({"a": [1, 2, 3]})
    assert "cannot unpickle" in _error(_archive(tmp_path / "cut.th", pickled[:-5], {}))


# ---------------------------------------------------------------- the peer checkpoints


@needs_fixtures
@pytest.mark.parametrize("name", ["ut-vqgan_ema_100.th", "ut-absorbing_ema_100.th"])
def test_unleashing_state_dicts_match_torch(name):
    got = read_torch_file(FIXTURES / name)
    want = torch.load(FIXTURES / name, map_location="cpu", weights_only=True)
    assert list(got) == list(want)
    for key, tensor in want.items():
        _same_tensor(got[key], tensor)


def _torch_reference(path: Path):
    """torch's own weights_only unpickler, allowed the checkpoint's extra globals through stand-ins."""
    import _codecs

    import numpy as np

    class ModelCheckpoint:
        pass

    core = getattr(np, "_core", None) or np.core
    allowed = [(ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
               core.multiarray.scalar, np.dtype, type(np.dtype("f8")), _codecs.encode]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


@needs_fixtures
@pytest.mark.parametrize("name, key, shape", [
    ("tt-vqgan-last.ckpt", "encoder.conv_in.weight", (32, 3, 3, 3)),
    ("tt-transformer-last.ckpt", "transformer.tok_emb.weight", None),
])
def test_taming_lightning_checkpoints(name, key, shape):
    path = FIXTURES / name
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)  # why this reader exists

    got = read_torch_file(path)
    assert "pytorch_lightning" not in sys.modules
    assert isinstance(got, dict) and type(got["state_dict"]) is collections.OrderedDict
    state = got["state_dict"]
    assert all(type(t) is torch.Tensor for t in state.values())
    assert key in state and (shape is None or state[key].shape == shape)
    callback = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert placeholder_name(got["checkpoint_callback"]) == callback
    assert [placeholder_name(k) for k in got["callbacks"]] == [callback]
    assert placeholder_name(got["checkpoint_callback"].state["kth_value"]) == "numpy._core.multiarray.scalar"

    want = _torch_reference(path)
    assert list(state) == list(want["state_dict"])
    for name_, tensor in want["state_dict"].items():
        _same_tensor(state[name_], tensor)
    assert "pytorch_lightning" not in sys.modules


# ---------------------------------------------------------------- memory

_MEASURE = textwrap.dedent("""
    import resource, sys
    import torch
    import vqtool.interop.torchfile as torchfile
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = torchfile.read_torch_file(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert sum(t.numel() for t in state.values()) == int(sys.argv[2])
    print((after - before) * (1 if sys.platform == "darwin" else 1024))
""")


_LAUNCH = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


@pytest.mark.skipif(sys.platform == "win32", reason="uses resource.getrusage")
def test_reading_keeps_one_copy_in_memory(tmp_path):
    # 64 MiB of float32, nearly all in one storage so that a second copy of any one storage would show
    state = {"big.weight": torch.randn(3840, 4096), **{f"layer{i}.weight": torch.randn(256, 1024) for i in range(4)}}
    path = _save(state, tmp_path / "big.th")
    numel = sum(t.numel() for t in state.values())
    del state
    size = path.stat().st_size
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Linux carries a process's peak RSS across exec, so a direct child would start at pytest's own peak; a small
    # launcher in between gives the measuring process a count of its own
    command = [sys.executable, "-c", _LAUNCH, sys.executable, "-c", _MEASURE, str(path), str(numel)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    rise = int(done.stdout.split()[-1])
    assert 0.5 * size < rise < 1.6 * size, f"peak RSS rose by {rise / size:.2f}× the file size"
