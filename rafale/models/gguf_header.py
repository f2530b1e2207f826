"""The header of a GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, versions 2 and
3): its metadata as Python values and its tensor index, read without numpy, torch or the gguf package.

    read_header(path) -> GGUFHeader
        .version, .metadata     {key: str | int | float | bool | list}, what gguf.GGUFReader's
                                field.contents() gives for every key (arrays of arrays flattened alike)
        .tensors                [TensorInfo(name, dims (innermost first, as stored), type, offset)]
        .data_offset            where the tensor data starts (offsets are relative to it)

Why not gguf.GGUFReader: it parses every metadata element into its own numpy view, so a 49k-token
vocabulary with its merges and token types takes seconds (~10 s for SmolLM2 on 2 shared cores), and
`rafale config show`, the tokenizer extraction and the model config need the metadata only. This walks
the memory-mapped header once with struct.unpack_from and reads each numeric array with one unpack;
the tensors are sliced from the file at the offsets it gives and dequantized by gguf (models/gguf.py).

A file cut off or malformed inside its header raises HeaderError (a ValueError) saying where.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf.GGUFReader reads
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

# GGUF value type -> struct format of one scalar (GGUFValueType: 8 is STRING, 9 is ARRAY).
STRING, ARRAY, UINT32 = 8, 9, 4
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class HeaderError(ValueError):
    """A GGUF header that ends early or holds something no GGUF writer writes."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF stores them
    type: int              # GGMLQuantizationType's value
    offset: int            # from GGUFHeader.data_offset


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    byte_order: str = "<"  # struct's: "<" little-endian (what llama.cpp writes), ">" big-endian


class _Walker:
    """Reads values one after another from a buffer, in the file's byte order."""

    def __init__(self, buf, order: str):
        self.buf, self.order, self.off, self.size = buf, order, 0, len(buf)

    def unpack(self, fmt: str, what: str) -> tuple:
        try:
            out = struct.unpack_from(self.order + fmt, self.buf, self.off)
        except struct.error:
            raise HeaderError(f"the file ends at byte {self.size}, inside {what} "
                              f"(from byte {self.off})") from None
        self.off += struct.calcsize(self.order + fmt)
        return out

    def string(self, what: str) -> str:
        (n,) = self.unpack("Q", what)
        end = self.off + n
        if end > self.size:
            raise HeaderError(f"the file ends at byte {self.size}, inside {what} (bytes {self.off}-{end})")
        try:
            text = str(self.buf[self.off:end], "utf-8")
        except UnicodeDecodeError:
            raise HeaderError(f"{what} at byte {self.off} is not UTF-8") from None
        self.off = end
        return text

    def strings(self, n: int, what: str) -> list[str]:
        """n strings: string() n times, inlined (a vocabulary holds ~100k of them)."""
        buf, off, size, out = self.buf, self.off, self.size, []
        length = struct.Struct(self.order + "Q").unpack_from
        try:
            for _ in range(n):
                (k,) = length(buf, off)
                end = off + 8 + k
                if end > size:
                    break
                out.append(str(buf[off + 8:end], "utf-8"))
                off = end
        except (struct.error, UnicodeDecodeError):
            pass
        self.off = off
        if len(out) < n:  # string() says what is wrong with the one that stopped the loop
            self.string(f"{what} (string {len(out)} of {n})")
        return out

    def value(self, vtype: int, what: str):
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            return self.array(what)
        fmt = SCALARS.get(vtype)
        if fmt is None:
            raise HeaderError(f"{what} has unknown value type {vtype}")
        return self.unpack(fmt, what)[0]

    def array(self, what: str) -> list:
        itype, n = self.unpack("IQ", what)
        if itype in SCALARS:  # one unpack for the whole array
            fmt = SCALARS[itype]
            if self.off + n * struct.calcsize(fmt) > self.size:
                raise HeaderError(f"the file ends at byte {self.size}, inside {what} ({n} values from "
                                  f"byte {self.off})")
            return list(self.unpack(f"{n}{fmt}", what))
        if itype == STRING:
            return self.strings(n, what)
        if itype == ARRAY:  # flattened, as gguf.GGUFReader's contents() gives it
            return [v for _ in range(n) for v in self.array(what)]
        raise HeaderError(f"{what} is an array of unknown value type {itype}")


def read_header(path: str | Path) -> GGUFHeader:
    """The version, metadata and tensor index of the GGUF file at `path` (see the module docstring)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < len(MAGIC):
            raise HeaderError(f"the file has {size} bytes, less than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, size)


def _parse(buf, size: int) -> GGUFHeader:
    if buf[:4] != MAGIC:
        raise HeaderError(f"it does not start with {MAGIC!r}")
    w = _Walker(buf, "<")
    w.off = 4
    (version,) = w.unpack("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader detects it)
        w.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in VERSIONS:
        raise HeaderError(f"GGUF version {version}; readable versions: {', '.join(map(str, VERSIONS))}")
    tensor_count, kv_count = w.unpack("QQ", "the tensor and metadata counts")
    meta: dict = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key = w.string(f"metadata key {i}")
        (vtype,) = w.unpack("I", f"the type of metadata {key!r}")
        if key in meta:
            raise HeaderError(f"metadata {key!r} appears twice")
        meta[key] = w.value(vtype, f"metadata {key!r}")
        if key == ALIGNMENT_KEY:
            if vtype != UINT32:
                raise HeaderError(f"{ALIGNMENT_KEY} has value type {vtype}, not uint32")
            alignment = meta[key]
            if alignment == 0 or alignment & (alignment - 1):
                raise HeaderError(f"{ALIGNMENT_KEY} is {alignment}, not a power of two")
    tensors = []
    for i in range(tensor_count):
        name = w.string(f"the name of tensor {i}")
        (n_dims,) = w.unpack("I", f"tensor {name!r}")
        dims = w.unpack(f"{n_dims}Q", f"the dimensions of tensor {name!r}")
        ttype, offset = w.unpack("IQ", f"tensor {name!r}")
        tensors.append(TensorInfo(name, tuple(dims), ttype, offset))
    data_offset = w.off + (-w.off) % alignment
    return GGUFHeader(version, meta, tensors, data_offset, size, w.order)
