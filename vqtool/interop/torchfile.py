"""Read files written by `torch.save` (zip format) without running anything named in them.

Taming Transformers' PyTorch Lightning `last.ckpt` files pickle trainer objects next to the weights (a
`pytorch_lightning...ModelCheckpoint` callback, numpy scalars): `torch.load(weights_only=True)` refuses them, and a
plain `torch.load` imports and calls whatever the pickle names, so a crafted checkpoint runs code on loading. This
reader unpickles with its own allowlist instead:

- tensors and storages are rebuilt by the functions below from the zip's raw bytes (always on the CPU);
- `collections.OrderedDict`, plain builtin data types and torch dtypes/`Size`/`device` are rebuilt as themselves;
- names of code-running modules and functions (`os.system`, `builtins.eval`, `subprocess.Popen`, `torch.load`, ...)
  make the whole file refused before anything is called;
- every other global becomes an inert `Placeholder` class made on the fly, never imported, that records how pickle
  built it (arguments, state), so callers can see and report what the file held.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import io
import os
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from typing import Any

import torch

from vqtool.errors import VqtoolError

__all__ = ["Placeholder", "placeholder_name", "read_torch_file"]

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, fixed fields we skip, name length, extra-field length
_CHUNK = 16 << 20  # bounds the temporary bytes when decompressing an entry torch did not store raw

# Whole modules a checkpoint has no reason to name: each of them can run a command, load code or reach into the
# interpreter. A file naming any of them is refused rather than turned into placeholders.
_CODE_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "shutil", "importlib", "imp",
    "zipimport", "runpy", "socket", "pty", "ctypes", "_ctypes", "multiprocessing", "webbrowser", "code", "codeop",
    "pickle", "_pickle", "marshal", "types", "io", "_io", "pdb", "bdb", "timeit", "signal", "threading", "_thread",
    "asyncio", "operator", "_operator", "gc", "cProfile", "profile", "trace", "dill", "cloudpickle",
})
_SAFE_BUILTINS = (set, frozenset, bytearray, bytes, slice, complex, range, object, int, float, str, bool, tuple, list,
                  dict)
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


# ---------------------------------------------------------------- placeholders


class _PlaceholderType(type):
    """Metaclass of placeholder classes. Read-only, because one class serves every file that names it and a BUILD
    opcode could otherwise set attributes on it that later files would meet."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls!r} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"{cls!r} is read-only")

    def __repr__(cls) -> str:
        if not cls._pickled_name:
            return type.__repr__(cls)
        return f"<placeholder class {cls._pickled_module}.{cls._pickled_name}>"


class Placeholder(metaclass=_PlaceholderType):
    """An object of a class (or the result of a function) that the file named and this reader did not import.

    `placeholder_name(obj)` gives the "module.name" the file used. Each instance records how pickle built it:
    `args`/`kwargs` of the call or `__new__`, `state` given to `__setstate__` (usually the object's `__dict__`),
    `listitems` appended and `dictitems` set.
    """

    _pickled_module = ""
    _pickled_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.listitems: list[Any] = []
        self.dictitems: dict[Any, Any] = {}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded the arguments

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.listitems.append(item)

    def extend(self, items: Any) -> None:
        self.listitems.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    def __reduce_ex__(self, protocol: Any) -> tuple:
        cls = type(self)
        return _restore_placeholder, (cls._pickled_module, cls._pickled_name, self.args, self.kwargs, self.state,
                                      self.listitems, self.dictitems)

    def __repr__(self) -> str:
        return f"<placeholder {type(self)._pickled_module}.{type(self)._pickled_name}>"


_CLASSES: dict[tuple[str, str], type[Placeholder]] = {}


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    cls = _CLASSES.get((module, name))
    if cls is None:
        short = name.rpartition(".")[2]
        namespace = {"_pickled_module": module, "_pickled_name": name, "__module__": __name__,
                     "__qualname__": f"Placeholder[{module}.{name}]"}
        made = _PlaceholderType(short if short.isidentifier() else "Placeholder", (Placeholder,), namespace)
        cls = _CLASSES.setdefault((module, name), made)
    return cls


def _restore_placeholder(module: str, name: str, args: tuple, kwargs: dict, state: Any, listitems: list,
                         dictitems: dict) -> Placeholder:
    obj = _placeholder_class(module, name)(*args, **kwargs)
    obj.state = state
    obj.listitems.extend(listitems)
    obj.dictitems.update(dictitems)
    return obj


def _reduce_placeholder_class(cls: type[Placeholder]) -> Any:
    if not cls._pickled_name:
        return cls.__qualname__  # the base class itself: pickled by reference
    return _placeholder_class, (cls._pickled_module, cls._pickled_name)


# Classes always pickle by reference, which cannot work for classes made on the fly; this makes a loaded checkpoint
# that holds placeholder classes (Lightning keys its callbacks dict by class) picklable again.
copyreg.pickle(_PlaceholderType, _reduce_placeholder_class)


def placeholder_name(obj: Any) -> str | None:
    """The "module.name" a file used for a placeholder instance or class; None for anything else."""
    cls = obj if isinstance(obj, type) else type(obj)
    if isinstance(cls, _PlaceholderType) and cls._pickled_name:
        return f"{cls._pickled_module}.{cls._pickled_name}"
    return None


# ---------------------------------------------------------------- what pickle may call


class _Frozen:
    """Base of the objects this reader hands to pickle: slotted and read-only, so a BUILD opcode cannot change them
    (a plain function's __defaults__ could be rewritten, and would stay rewritten for the next file)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def _init(self, **fields: Any) -> None:
        for key, value in fields.items():
            object.__setattr__(self, key, value)


class _Rebuild(_Frozen):
    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Any) -> None:
        self._init(name=name, fn=fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _StorageType(_Frozen):
    """Stands for torch.FloatStorage & co in persistent ids; dtype None is torch.UntypedStorage (bytes)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype | None) -> None:
        self._init(name=name, dtype=dtype)


class _TensorType(_Frozen):
    """Stands for torch.Tensor / torch.nn.Parameter as the type argument of _rebuild_from_type_v2."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self._init(name=name)


class _Storage(_Frozen):
    """One storage of the file: `data` is the uint8 buffer of its zip entry, shared by every tensor that uses it."""

    __slots__ = ("key", "data", "nbytes", "dtype")

    def __init__(self, key: str, data: torch.Tensor, nbytes: int, dtype: torch.dtype | None) -> None:
        self._init(key=key, data=data, nbytes=nbytes, dtype=dtype)


def _ints(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(type(v) is int for v in value)


def _view(storage: Any, dtype: torch.dtype | None, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise TypeError(f"a tensor is rebuilt from {type(storage).__name__}, not from one of the file's storages")
    dtype = dtype or storage.dtype or torch.uint8
    if type(offset) is not int or not _ints(size) or not _ints(stride) or len(size) != len(stride):
        raise TypeError(f"bad tensor geometry: offset {offset!r}, size {size!r}, stride {stride!r}")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise ValueError(f"negative tensor geometry: offset {offset}, size {size}, stride {stride}")
    # set_ does not bounds-check: it silently grows the storage, so check here that the view stays inside it
    last = offset if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last * dtype.itemsize > storage.nbytes:
        raise ValueError(f"a tensor of size {tuple(size)} reaches byte {last * dtype.itemsize} of storage "
                         f"{storage.key}, which holds {storage.nbytes}")
    return torch.empty(0, dtype=dtype).set_(storage.data.untyped_storage(), offset, tuple(size), tuple(stride))


def _finish(tensor: torch.Tensor, requires_grad: Any, metadata: Any) -> torch.Tensor:
    # backward hooks are never saved by torch (always an empty OrderedDict), so they are not attached
    if type(requires_grad) is not bool:
        raise TypeError(f"requires_grad is {type(requires_grad).__name__}, not bool")
    if metadata:
        # torch records only the conj/neg bits of complex views here
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise ValueError(f"unknown tensor metadata {metadata!r}")
        if not all(type(v) is bool for v in metadata.values()):
            raise TypeError(f"tensor metadata {metadata!r} is not all bools")
        torch._C._set_tensor_metadata(tensor, dict(metadata))
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _view(storage, None, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
                       metadata: Any = None) -> torch.Tensor:
    return _finish(_view(storage, None, offset, size, stride), requires_grad, metadata)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
                       dtype: Any, metadata: Any = None) -> torch.Tensor:
    # torch writes dtypes without a typed storage class (uint16, float8, ...) as UntypedStorage + dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype is {type(dtype).__name__}, not torch.dtype")
    return _finish(_view(storage, dtype, offset, size, stride), requires_grad, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool:
        raise TypeError("a Parameter is rebuilt from something other than a tensor and a bool")
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> torch.Tensor:
    # the state is Python attributes set on the parameter; setting names chosen by the file on a real object is not
    # worth the risk, and no state dict needs them
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_TENSOR_REBUILDS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
}


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch wraps a tensor rebuild this way when the tensor is a subclass or carries Python attributes
    if not (isinstance(func, _Rebuild) and func.name in _TENSOR_REBUILDS and isinstance(args, tuple)):
        raise TypeError(f"_rebuild_from_type_v2 of {func!r}, not of a tensor rebuild")
    tensor = func(*args)
    if isinstance(new_type, _TensorType):
        return tensor  # the attributes (state) of a plain tensor or Parameter are dropped, as for Parameters
    if isinstance(new_type, _PlaceholderType):
        obj = new_type(tensor)  # a tensor subclass we did not import: keep its name, the data and its state
        obj.state = state
        return obj
    raise TypeError(f"_rebuild_from_type_v2 to {new_type!r}, not a tensor type")


def _allowed_globals() -> dict[str, Any]:
    table: dict[str, Any] = {"collections.OrderedDict": collections.OrderedDict}
    table.update({f"builtins.{t.__name__}": t for t in _SAFE_BUILTINS})
    table.update({name: _Rebuild(name, fn) for name, fn in _TENSOR_REBUILDS.items()})
    for name in ("torch._tensor._rebuild_from_type_v2", "torch._tensor._rebuild_from_type"):
        table[name] = _Rebuild(name, _rebuild_from_type_v2)  # the old one takes the same arguments
    table.update({f"torch.{n}": _StorageType(f"torch.{n}", dtype) for n, dtype in _STORAGE_DTYPES.items()})
    table["torch.UntypedStorage"] = table["torch.storage.UntypedStorage"] = _StorageType("torch.UntypedStorage", None)
    # torch pickles dtypes, layouts and memory formats as the global of their name ("torch float32")
    table.update({f"torch.{name}": value for name, value in vars(torch).items()
                  if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))})
    table["torch.Size"], table["torch.device"] = torch.Size, torch.device
    for name in ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.Parameter", "torch.nn.parameter.Parameter"):
        table[name] = _TensorType(name)
    return table


_ALLOWED = _allowed_globals()


# ---------------------------------------------------------------- the reader


def _clip(text: Any, limit: int = 160) -> str:
    flat = " ".join(str(text).split())  # messages must stay one line whatever the file put in its names
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _refusal(path: str, qual: str, why: str) -> VqtoolError:
    return VqtoolError(f"{path}: refusing to read: its pickle names {qual}, {why}; "
                       "checkpoints saved by the official code never do this")


def _corrupt(path: str, what: str) -> VqtoolError:
    return VqtoolError(f"{path}: corrupt or truncated checkpoint: {_clip(what)}; copy or download it again")


class _Archive:
    """The zip side: the archive folder, the byte order check and the storages, read once per key."""

    def __init__(self, path: str, fp: Any, zf: zipfile.ZipFile) -> None:
        self.path, self.fp, self.zf = path, fp, zf
        self._buffers: dict[str, torch.Tensor] = {}
        names = zf.namelist()
        # the folder is named after the file torch.save wrote at first ("archive", "last", ...)
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            found = "no <archive>/data.pkl entry" if not pickles else f"{len(pickles)} data.pkl entries"
            raise VqtoolError(f"{path}: a zip file but not one written by torch.save ({found})")
        self.prefix = pickles[0][: -len("/data.pkl")]
        order = "little"  # torch before 1.10 wrote no byteorder record; those files came from little-endian machines
        if f"{self.prefix}/byteorder" in names:
            order = self.read_small(f"{self.prefix}/byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise _corrupt(path, f"its byteorder record says {order!r}")
        if order != sys.byteorder:
            raise VqtoolError(f"{path}: written on a {order}-endian machine; this reader reads {sys.byteorder}-endian "
                              f"files only: save it again with torch on a {sys.byteorder}-endian machine")

    def read_small(self, name: str) -> bytes:
        try:
            return self.zf.read(name)
        # RuntimeError also covers zipfile's refusal of a compression method it does not know.
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError) as exc:
            raise _corrupt(self.path, f"{name}: {exc}") from exc

    def storage(self, key: str) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None:
            name = f"{self.prefix}/data/{key}"
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                raise _corrupt(self.path, f"its pickle uses storage {key} but the zip has no entry {name}") from None
            try:
                buf = self._read_entry(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError) as exc:
                raise _corrupt(self.path, f"{name}: {exc}") from exc
            self._buffers[key] = buf
        return buf

    def _read_entry(self, info: zipfile.ZipInfo) -> torch.Tensor:
        # Straight into the tensor that will hold the data: one copy of the weights in memory, no bytes objects.
        buf = torch.empty(info.file_size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        filled = 0
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            # torch stores entries uncompressed; the data starts after the local header, whose extra field
            # (alignment padding) differs from the central directory's
            self.fp.seek(info.header_offset)
            header = self.fp.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size:
                raise EOFError("the file ends inside a zip header")
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            if signature != b"PK\x03\x04":
                raise zipfile.BadZipFile("bad local file header")
            self.fp.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
            while filled < len(view):
                got = self.fp.readinto(view[filled:])
                if not got:
                    raise EOFError(f"the file ends after {filled} of its {len(view)} bytes")
                filled += got
            if zlib.crc32(view) != info.CRC:
                raise zipfile.BadZipFile("its bytes do not match their CRC")
        else:
            with self.zf.open(info) as src:  # zipfile checks the CRC
                while filled < len(view):
                    got = src.readinto(view[filled : filled + _CHUNK])
                    if not got:
                        raise EOFError(f"the entry ends after {filled} of its {len(view)} bytes")
                    filled += got
        return buf


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        # Both GLOBAL and STACK_GLOBAL come here, before the named object could be called. Nothing is imported:
        # the answer is one of ours, a refusal, or a placeholder. Python 2 names are mapped only to judge them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qual = f"{module}.{name}"
        if qual in _ALLOWED:
            return _ALLOWED[qual]
        top = module.partition(".")[0]
        shown = _clip(qual, 80)
        if top in ("posix", "nt"):
            shown += f" (os.{_clip(name, 40)})"
        if top in _CODE_MODULES or top == "builtins":
            raise _refusal(self._archive.path, shown, "which would run code on loading")
        if top == "torch":
            if module in ("torch._utils", "torch._tensor") and name.startswith("_rebuild") and name.isidentifier():
                raise _refusal(self._archive.path, shown,
                               "a kind of tensor this reader does not rebuild (it rebuilds dense tensors)")
            raise _refusal(self._archive.path, shown, "which would run code on loading")
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        # torch.save writes ('storage', storage type, key, location, numel) and nothing else
        if not (isinstance(pid, tuple) and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and type(pid[2]) is str and type(pid[3]) is str
                and type(pid[4]) is int and pid[4] >= 0):
            what = f"a {len(pid)}-tuple" if isinstance(pid, tuple) else type(pid).__name__
            raise VqtoolError(f"{self._archive.path}: refusing to read: its pickle asks for a persistent object "
                              f"({what}) that is not a tensor storage; torch.save never writes one")
        _, kind, key, _location, numel = pid  # the location is ignored: everything is rebuilt on the CPU
        data = self._archive.storage(key)
        nbytes = numel * (kind.dtype.itemsize if kind.dtype is not None else 1)
        if nbytes > data.numel():
            raise _corrupt(self._archive.path, f"storage {key} should hold {nbytes} bytes, its entry {data.numel()}")
        return _Storage(key, data, nbytes, kind.dtype)


def _check_opcodes(path: str, data: bytes) -> None:
    # EXT1/2/4 fetch globals from copyreg's process-wide extension cache, which can bypass find_class
    for opcode, _arg, _pos in pickletools.genops(data):
        if opcode.name in ("EXT1", "EXT2", "EXT4"):
            raise VqtoolError(f"{path}: refusing to read: its pickle uses copyreg extension codes ({opcode.name}), "
                              "which torch.save never writes")


def read_torch_file(path: str | os.PathLike[str]) -> Any:
    """The object a `torch.save` zip-format file holds, tensors rebuilt as CPU tensors, without running its code.

    Tensors that shared a storage when saved share memory again. Classes and functions the file names that are not
    tensors or plain data come back as `Placeholder`s; a file naming code-running globals is refused. Every problem
    is a one-line VqtoolError naming the file.
    """
    shown = os.fspath(path)
    try:
        fp = open(shown, "rb")  # closed by the `with fp` below
    except FileNotFoundError:
        raise VqtoolError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise VqtoolError(f"{shown}: is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise VqtoolError(f"{shown}: cannot open it: {_clip(exc.strerror or exc)}") from None
    with fp:
        if fp.read(2) != b"PK":
            raise VqtoolError(f"{shown}: not a torch.save zip file; files saved by torch older than 1.6 (legacy "
                              "format) are not supported: save it again with a newer torch where you trust the file")
        try:
            zf = zipfile.ZipFile(fp)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
            raise _corrupt(shown, f"not a readable zip ({exc})") from exc
        with zf:
            archive = _Archive(shown, fp, zf)
            data = archive.read_small(f"{archive.prefix}/data.pkl")
            try:
                _check_opcodes(shown, data)
                return _Unpickler(data, archive).load()
            except VqtoolError:
                raise
            except Exception as exc:  # whatever a malformed pickle makes the unpickler or our rebuilds raise
                raise VqtoolError(f"{shown}: cannot unpickle {archive.prefix}/data.pkl ({type(exc).__name__}: "
                                  f"{_clip(exc)}); the file is corrupt or was not written by torch.save") from exc
