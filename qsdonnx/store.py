"""Tensor data kept out of the graph: external data is read when asked, one tensor at a time.

A model is loaded without its external data (``onnx.load(..., load_external_data=False)``):
its graph is small and is edited freely, and each large tensor is a reference (file, offset,
length) into a data file next to the model.  :func:`tensor_array` reads such a reference into a
read-only numpy array, so a weight costs memory only while it is being used, and the page
cache, not the process, keeps what was read.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

_MAPS: dict[tuple[str, int], mmap.mmap] = {}


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _map_key(path: Path, st: os.stat_result) -> tuple[str, int]:
    """A data file's key in :data:`_MAPS` (a rewritten file gets a new map)."""
    return str(path.resolve()), st.st_mtime_ns


def _mapped(path: Path) -> mmap.mmap:
    st = path.stat()
    key = _map_key(path, st)
    m = _MAPS.get(key)
    if m is None:
        with open(path, "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else None
        _MAPS[key] = m
    return m


def np_dtype(data_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))


def tensor_array(tensor: onnx.TensorProto, base_dir: Optional[Path], mapped: bool = False,
                 writable: bool = False) -> np.ndarray:
    """The values of ``tensor``: from the protobuf, or read (read-only, unless ``writable``: the
    caller then owns the copy) from its external data file (``base_dir`` is the model's folder).
    ``mapped`` gives a view of the memory-mapped file instead (for ONNX Runtime sessions, which
    hold every weight anyway: the page cache is shared)."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    path = _data_path(tensor, base_dir)
    offset = int(info.get("offset", 0) or 0)
    dtype = np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type == onnx.TensorProto.STRING:
        t = onnx.TensorProto()
        t.CopyFrom(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(t, str(base_dir))
        return numpy_helper.to_array(t)
    if dtype.itemsize == 0 or tensor.data_type in SUB_BYTE_TYPES:
        # Packed sub-byte tensors: their stored bytes, decoded by onnx.
        return numpy_helper.to_array(inline_copy(tensor, base_dir))
    if not count:
        return np.zeros(tuple(tensor.dims), dtype)
    if mapped:
        return np.frombuffer(_mapped(path), dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))
    # A private copy, read from the (page-cached) file: it costs memory only while the caller
    # holds it. A view of the mapping would stay in the process's resident set once touched,
    # so a pass reading every weight would end up holding the whole model.
    arr = _read(tensor, path, offset, count, dtype)
    arr.flags.writeable = writable
    return arr.reshape(tuple(tensor.dims))


def _read(tensor: onnx.TensorProto, path: Path, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    arr = np.empty(count, dtype)
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            raise ValueError(f"external data of tensor {tensor.name!r} is shorter than its shape needs")
    return arr


def reads_rows(tensor: onnx.TensorProto) -> bool:
    """Whether :func:`tensor_rows` can read slices of ``tensor`` (external, of a whole-byte type)."""
    return (is_external(tensor) and len(tensor.dims) >= 1 and tensor.data_type not in SUB_BYTE_TYPES
            and tensor.data_type != onnx.TensorProto.STRING and np_dtype(tensor.data_type).itemsize > 0)


def tensor_rows(tensor: onnx.TensorProto, base_dir: Optional[Path], start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the first axis of an external tensor (see :func:`reads_rows`),
    read from its data file alone: a private, writable array of shape ``(stop - start, *dims[1:])``."""
    dims = tuple(int(d) for d in tensor.dims)
    stop = min(stop, dims[0])
    row = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    dtype = np_dtype(tensor.data_type)
    offset = int(external_info(tensor).get("offset", 0) or 0) + start * row * dtype.itemsize
    return _read(tensor, _data_path(tensor, base_dir), offset, (stop - start) * row, dtype).reshape((stop - start,) + dims[1:])


def _data_path(tensor: onnx.TensorProto, base_dir: Optional[Path]) -> Path:
    """The file holding an external tensor: its location relative to the model's folder, or an
    absolute one (tensors written to a :class:`TensorSpill` while the output is being built)."""
    location = external_info(tensor)["location"]
    if os.path.isabs(location):
        return Path(location)
    if base_dir is None:
        raise ValueError(f"tensor {tensor.name!r} is in external data but the model has no folder")
    return Path(base_dir) / location


def stored_bytes(tensor: onnx.TensorProto, base_dir: Optional[Path]) -> bytes:
    """A tensor's payload as ``raw_data`` holds it (packed for sub-byte types), read from its
    external data when it has some."""
    if not is_external(tensor):
        return tensor.raw_data if tensor.raw_data else numpy_helper.to_array(tensor).tobytes()
    info = external_info(tensor)
    length = tensor_nbytes(tensor)
    with open(_data_path(tensor, base_dir), "rb") as fh:
        fh.seek(int(info.get("offset", 0) or 0))
        data = fh.read(length)
    if len(data) != length:
        raise ValueError(f"external data of tensor {tensor.name!r} is shorter than its shape needs")
    return data


def inline_copy(tensor: onnx.TensorProto, base_dir: Optional[Path]) -> onnx.TensorProto:
    """A copy of ``tensor`` with its payload in ``raw_data``."""
    t = onnx.TensorProto()
    t.name, t.data_type = tensor.name, tensor.data_type
    t.dims.extend(tensor.dims)
    t.raw_data = stored_bytes(tensor, base_dir)
    return t


class TensorSpill:
    """A data file that new tensors are moved to as soon as they are made (each replaced by an
    external reference with an absolute location), so that an output larger than memory is
    never held: the save step makes this file the output's data file, or copies them into it."""

    ALIGN = 4096

    def __init__(self, folder: Path, min_bytes: int = 1024):
        import tempfile

        fd, name = tempfile.mkstemp(prefix=".qsdonnx-tensors-", suffix=".data", dir=folder)
        self.path = Path(name).resolve()
        self.fh = os.fdopen(fd, "wb", buffering=0)
        self.min_bytes = min_bytes
        self.bytes = 0

    def put(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor``, or when it holds at least ``min_bytes``, a new reference to its payload
        written to the file. (A new message: protobuf keeps a cleared field's bytes in the
        message's memory for as long as the message lives.)"""
        if is_external(tensor) or not tensor.raw_data or len(tensor.raw_data) < self.min_bytes:
            return tensor
        offset = self.fh.tell()
        pad = (-offset) % self.ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            offset += pad
        self.fh.write(tensor.raw_data)
        length = len(tensor.raw_data)
        self.bytes += length
        return external_stub(tensor, str(self.path), length, offset)

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's payload, without reading external data."""
    if is_external(tensor):
        length = external_info(tensor).get("length")
        if length:
            return int(length)
        return int(np.prod(tensor.dims)) * np_dtype(tensor.data_type).itemsize if tensor.dims else 0
    if tensor.raw_data:
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def external_tensors(model: onnx.ModelProto):
    """Initializers and Constant-node tensors of the main graph held in external data."""
    for t in model.graph.initializer:
        if is_external(t):
            yield t
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and is_external(a.t):
                yield a.t


SUB_BYTE_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1")
                  if hasattr(onnx.TensorProto, n)}


def external_stub(tensor: onnx.TensorProto, location: str, length: int, offset: int = 0) -> onnx.TensorProto:
    """A tensor with ``tensor``'s name, type and shape whose data is declared to be ``length``
    bytes at ``offset`` of ``location``: a reference to bytes held elsewhere."""
    stub = onnx.TensorProto()
    stub.name, stub.data_type = tensor.name, tensor.data_type
    stub.dims.extend(tensor.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = stub.external_data.add()
        e.key, e.value = key, value
    return stub


def structure_copy(model: onnx.ModelProto, min_bytes: int = 1024,
                   whole_bytes_only: bool = False) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of ``model`` whose initializers of at least ``min_bytes`` (and all external ones)
    are left out, with the left-out tensors (not copied: the model's own objects).

    Used where a tool needs the graph but not the weights (opset conversion, sessions fed the
    weights separately), so the weights are never serialized or duplicated.  ``whole_bytes_only``
    keeps packed sub-byte and string tensors in the copy.
    """
    big = [t for t in model.graph.initializer if is_external(t) or (
        tensor_nbytes(t) >= min_bytes and not (whole_bytes_only and (t.data_type in SUB_BYTE_TYPES
                                                                    or t.data_type == onnx.TensorProto.STRING)))]
    names = {t.name for t in big}
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name not in names)
    return out, big


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def release_pages(tensors, base_dir: Optional[Path]) -> None:
    """Drops the pages of these external tensors from this process's memory map (they stay in
    the page cache): what a session read through :func:`tensor_array` ``(mapped=True)`` stops
    counting in the process's memory once the session is gone."""
    page = mmap.PAGESIZE
    for t in tensors:
        if not is_external(t) or not hasattr(mmap, "MADV_DONTNEED"):
            continue
        info = external_info(t)
        path = _data_path(t, base_dir)
        try:
            m = _MAPS.get(_map_key(path, path.stat()))
        except OSError:
            continue
        if m is None:
            continue
        offset = int(info.get("offset", 0))
        length = int(info.get("length", 0)) or tensor_nbytes(t)
        start = offset // page * page
        end = min(len(m), offset + length)
        if end > start:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)


def release_maps() -> None:
    """Closes every memory map (tests and long-running callers)."""
    for m in _MAPS.values():
        if m is not None:
            try:
                m.close()
            except BufferError:  # a numpy view still refers to it; it closes when that goes
                pass
    _MAPS.clear()


def file_size(path: os.PathLike) -> int:
    return Path(path).stat().st_size
