"""NIfTI integrity: one streaming pass over a ``.nii``/``.nii.gz`` that finds truncation and counts NaN/Inf voxels.

ITK silently zero-fills a cut-off NIfTI file and (SimpleITK <= 2.5) reads NaN as 0, so both are checked on the bytes
on disk, in bounded memory whatever the file size.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

_NIFTI_HEAD = 544  # NIfTI-2 header size; NIfTI-1 uses the first 348 bytes
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real floating-point voxels


class _Broken(Exception):
    """A compressed stream that cannot be decompressed to its end."""


def _file_bytes(path: Path) -> Iterator[bytes]:
    """The (decompressed, for ``.gz``) bytes of a file in bounded chunks; raises :class:`_Broken` on a cut-off or
    corrupt gzip stream (several gzip members are fine; padding after the last one is ignored)."""
    with open(path, "rb") as fh:
        if not path.name.lower().endswith(".gz"):
            while chunk := fh.read(1 << 22):
                yield chunk
            return
        d, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
        while True:
            if not pending:
                pending = fh.read(1 << 20)
                if not pending:
                    break
            try:
                out = d.decompress(pending, 1 << 22)
            except zlib.error as e:
                raise _Broken(f"compressed data is corrupt: {e}") from None
            pending = d.unconsumed_tail
            if out:
                yield out
            if d.eof:
                rest = d.unused_data + pending
                if len(rest) < 2:
                    rest += fh.read(1 << 20)
                if not rest.startswith(b"\x1f\x8b"):
                    return
                d, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
        if not d.eof:
            raise _Broken("gzip stream ends early")


def nifti_scan(path: Path) -> tuple[str | None, tuple[int, int]]:
    """One streaming pass over a ``.nii``/``.nii.gz``: why it is truncated or corrupt (None if it is not), and its
    (NaN, Inf) voxel counts for float data. Memory stays bounded (a few MiB), whatever the file size."""
    total, nan, inf = 0, 0, 0
    head = bytearray()
    layout = None  # (voxel start, voxel end, numpy dtype or None), once the header is in
    carry = b""

    def count(data: bytes, start: int) -> None:
        nonlocal nan, inf, carry
        lo, hi, dtype = layout
        data = data[max(lo - start, 0) : max(hi - start, 0)]
        if dtype is None or not data:
            return
        data = carry + data
        usable = len(data) - len(data) % dtype.itemsize
        values, carry = np.frombuffer(data[:usable], dtype), data[usable:]
        nan += int(np.count_nonzero(np.isnan(values)))
        inf += int(np.count_nonzero(np.isinf(values)))

    try:
        for chunk in _file_bytes(path):
            if layout is None:
                head += chunk
                if len(head) >= _NIFTI_HEAD:
                    layout = _nifti_layout(bytes(head[:_NIFTI_HEAD]))
                    if layout is None:
                        return None, (0, 0)
                    if layout[2] is None and not path.name.lower().endswith(".gz"):
                        total = path.stat().st_size  # uncompressed, no floats to count: the size says it all
                        break
                    count(bytes(head), 0)
                    head = bytearray(head[:_NIFTI_HEAD])
            else:
                count(chunk, total)
            total += len(chunk)
    except _Broken as e:
        return f"{e}, after {total} decompressed bytes", (nan, inf)
    if layout is None:  # a file shorter than 544 bytes (tiny NIfTI-1 image)
        layout = _nifti_layout(bytes(head))
        if layout is None:
            return None, (0, 0)
        count(bytes(head), 0)
    if total < layout[1]:
        return f"holds {total} bytes, header promises {layout[1]}", (nan, inf)
    return None, (nan, inf)


def _nifti_layout(head: bytes) -> tuple[int, int, np.dtype | None] | None:
    """(voxel start, voxel end, float dtype or None) of a single-file NIfTI-1/2 header; None if not one."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            dims = struct.unpack(endian + "8h", head[40:56])
            offset = max(int(struct.unpack(endian + "f", head[108:112])[0]), 352)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = max(int(struct.unpack(endian + "q", head[168:176])[0]), 544)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(n < 0 for n in dims[1 : dims[0] + 1]):
        return None
    end = offset + (math.prod(dims[1 : dims[0] + 1]) * bitpix + 7) // 8
    dtype = np.dtype(endian + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
    return offset, end, dtype


def nonfinite_counts(arr: np.ndarray) -> tuple[int, int]:
    """(NaN, Inf) voxel counts of an array; (0, 0) for integer data."""
    if not np.issubdtype(arr.dtype, np.inexact):
        return 0, 0
    return int(np.count_nonzero(np.isnan(arr))), int(np.count_nonzero(np.isinf(arr)))
