"""Read a GGUF file's header (metadata and tensor infos) without touching tensor data.

A small struct-based parser for GGUF versions 2 and 3 (little- or big-endian). The file
is memory-mapped and only the header pages are read; large arrays (tokenizer tokens,
merges, scores) are skipped and kept as an `ArraySummary` (type and length), so a
262k-token vocabulary costs a few tens of milliseconds, not seconds.

Tensor byte sizes follow ggml's block table: ne[0] / block_size * type_size * ne[1] * ...
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Arrays longer than this are summarised, not decoded (per-layer arrays stay decoded).
MAX_DECODED_ARRAY_ITEMS = 4096


class GGUFError(ValueError):
    """The file is not a GGUF file, or its header is truncated or malformed."""


class GGUFTruncated(GGUFError):
    """The header runs past the bytes at hand (a truncated file, or a prefix too short)."""


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: `block_size` elements take `type_size` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


def _t(id_: int, name: str, block_size: int, type_size: int) -> tuple[int, GGMLType]:
    return id_, GGMLType(id_, name, block_size, type_size)


# ggml/include/ggml.h (type ids) and ggml/src/ggml.c type_traits (block and type sizes).
GGML_TYPES: dict[int, GGMLType] = dict(
    [
        _t(0, "F32", 1, 4),
        _t(1, "F16", 1, 2),
        _t(2, "Q4_0", 32, 18),
        _t(3, "Q4_1", 32, 20),
        _t(6, "Q5_0", 32, 22),
        _t(7, "Q5_1", 32, 24),
        _t(8, "Q8_0", 32, 34),
        _t(9, "Q8_1", 32, 36),
        _t(10, "Q2_K", 256, 84),
        _t(11, "Q3_K", 256, 110),
        _t(12, "Q4_K", 256, 144),
        _t(13, "Q5_K", 256, 176),
        _t(14, "Q6_K", 256, 210),
        _t(15, "Q8_K", 256, 292),
        _t(16, "IQ2_XXS", 256, 66),
        _t(17, "IQ2_XS", 256, 74),
        _t(18, "IQ3_XXS", 256, 98),
        _t(19, "IQ1_S", 256, 50),
        _t(20, "IQ4_NL", 32, 18),
        _t(21, "IQ3_S", 256, 110),
        _t(22, "IQ2_S", 256, 82),
        _t(23, "IQ4_XS", 256, 136),
        _t(24, "I8", 1, 1),
        _t(25, "I16", 1, 2),
        _t(26, "I32", 1, 4),
        _t(27, "I64", 1, 8),
        _t(28, "F64", 1, 8),
        _t(29, "IQ1_M", 256, 56),
        _t(30, "BF16", 1, 2),
        _t(31, "Q4_0_4_4", 32, 18),
        _t(32, "Q4_0_4_8", 32, 18),
        _t(33, "Q4_0_8_8", 32, 18),
        _t(34, "TQ1_0", 256, 54),
        _t(35, "TQ2_0", 256, 66),
        _t(36, "IQ4_NL_4_4", 32, 18),
        _t(37, "IQ4_NL_4_8", 32, 18),
        _t(38, "IQ4_NL_8_8", 32, 18),
        _t(39, "MXFP4", 32, 17),
        _t(40, "NVFP4", 64, 36),
        _t(41, "Q1_0", 128, 18),
        _t(42, "Q2_0", 64, 18),
    ]
)
_TYPES_BY_NAME = {t.name: t for t in GGML_TYPES.values()}

# llama_ftype (general.file_type) -> the name llama.cpp's quantize uses.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}


def ggml_type(type_id_or_name: int | str) -> GGMLType:
    """The ggml type for an id (as stored in GGUF) or a name such as 'q8_0'."""
    if isinstance(type_id_or_name, str):
        found = _TYPES_BY_NAME.get(type_id_or_name.upper())
    else:
        found = GGML_TYPES.get(type_id_or_name)
    if found is None:
        raise GGUFError(f"unknown ggml tensor type {type_id_or_name!r}")
    return found


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes of a contiguous tensor of `shape` (ggml order, ne[0] first) and type."""
    t = ggml_type(type_id)
    if not shape:
        return t.type_size
    if shape[0] % t.block_size:
        raise GGUFError(f"row of {shape[0]} elements is not a multiple of {t.name}'s block of {t.block_size}")
    return shape[0] // t.block_size * t.type_size * math.prod(shape[1:])


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    ggml_type: int
    offset: int  # relative to the start of the data section
    n_bytes: int

    @property
    def type_name(self) -> str:
        return ggml_type(self.ggml_type).name


@dataclass(frozen=True)
class ArraySummary:
    """A large metadata array that was skipped: its element type id and length."""

    element_type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int  # absolute file offset of the first tensor's data
    file_bytes: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


# GGUF metadata value types: id -> (struct code, size); 8 = string, 9 = array.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential reader over a buffer with bounds checks that raise GGUFError."""

    def __init__(self, buf: Any, endian: str, size: int) -> None:
        self.buf, self.endian, self.size, self.pos = buf, endian, size, 0

    def unpack(self, code: str, nbytes: int) -> Any:
        if self.pos + nbytes > self.size:
            raise GGUFTruncated(f"truncated GGUF header at byte {self.pos}")
        (value,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += nbytes
        return value

    def u32(self) -> int:
        return self.unpack("I", 4)

    def u64(self) -> int:
        return self.unpack("Q", 8)

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > self.size:
            raise GGUFTruncated(f"truncated GGUF string at byte {self.pos}")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        unpack_from, fmt, pos, buf = struct.unpack_from, self.endian + "Q", self.pos, self.buf
        for _ in range(count):
            pos += 8 + unpack_from(fmt, buf, pos)[0]
        if pos > self.size:
            raise GGUFTruncated("truncated GGUF string array")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise GGUFError(f"unknown GGUF metadata value type {vtype} at byte {self.pos}")

    def array(self) -> Any:
        etype, count = self.u32(), self.u64()
        if count > MAX_DECODED_ARRAY_ITEMS:
            if etype in _SCALARS:
                self.pos += count * _SCALARS[etype][1]
                if self.pos > self.size:
                    raise GGUFTruncated("truncated GGUF array")
            elif etype == _STRING:
                self.skip_strings(count)
            else:
                for _ in range(count):
                    self.value(etype)
            return ArraySummary(etype, count)
        if etype in _SCALARS:
            code, size = _SCALARS[etype]
            if self.pos + size * count > self.size:
                raise GGUFTruncated("truncated GGUF array")
            values = list(struct.unpack_from(f"{self.endian}{count}{code}", self.buf, self.pos))
            self.pos += size * count
            return values
        return [self.value(etype) for _ in range(count)]


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse the header of the GGUF file at `path`; raise GGUFError if it is not one."""
    path = Path(path)
    with open(path, "rb") as f:
        file_bytes = path.stat().st_size
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        if file_bytes < 24:
            raise GGUFError(f"{path}: truncated GGUF header ({file_bytes} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _parse(mm, str(path), file_bytes)
            except struct.error as exc:
                raise GGUFError(f"{path}: truncated or malformed GGUF header ({exc})") from None


def parse_gguf_prefix(prefix: bytes, source: str, file_bytes: int) -> GGUFHeader:
    """Parse the header from the first bytes of a GGUF file whose full size is `file_bytes`.

    For a file read over the network by ranges: a header that runs past the prefix raises
    GGUFTruncated (a GGUFError saying 'truncated'), and a longer prefix may then succeed.
    """
    available = min(len(prefix), file_bytes)
    short = available < file_bytes
    if bytes(prefix[:4]) != GGUF_MAGIC and len(prefix) >= 4:
        raise GGUFError(f"{source}: not a GGUF file (magic {bytes(prefix[:4])!r}, expected {GGUF_MAGIC!r})")
    if available < 24:
        error = GGUFTruncated if short else GGUFError
        raise error(f"{source}: truncated GGUF header ({available} of {file_bytes} bytes at hand)")
    try:
        return _parse(prefix, source, file_bytes, limit=available)
    except GGUFTruncated as exc:
        where = f"it runs past the first {available} bytes" if short else f"the file ends at {file_bytes} bytes"
        raise GGUFTruncated(f"{source}: GGUF header truncated: {where} ({exc})") from None
    except struct.error as exc:
        error = GGUFTruncated if short else GGUFError
        raise error(f"{source}: truncated or malformed GGUF header within the first {available} bytes ({exc})") from None


def _parse(buf: Any, path: str, file_bytes: int, limit: int | None = None) -> GGUFHeader:
    """`limit`: the bytes of `buf` that may be read (default: the whole file)."""
    version_le = struct.unpack_from("<I", buf, 4)[0]
    endian = "<" if version_le & 0xFFFF else ">"
    cur = _Cursor(buf, endian, file_bytes if limit is None else limit)
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (this reader handles 2 and 3)")
    n_tensors, n_kv = cur.u64(), cur.u64()
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.u32())
    raw_infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64() for _ in range(n_dims))
        raw_infos.append((name, shape, cur.u32(), cur.u64()))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = tuple(
        TensorInfo(name, shape, type_id, offset, tensor_nbytes(type_id, shape))
        for name, shape, type_id, offset in raw_infos
    )
    return GGUFHeader(path, version, metadata, tensors, alignment, data_offset, file_bytes)
