"""Frame compression the way areaDetector's NDPluginCodec does it (core).

NDPluginCodec sends the compressed bytes in the NTNDArray's ``ubyteValue``, the codec name in
``codec.name`` and the original pixel type as a pvData ScalarType code in
``codec.parameters`` (ADCore ``NDCodec.cpp``, ``ntndArrayConverter.cpp``).  The codecs are
the libraries areaDetector and pvapy use: ``lz4.block`` (raw LZ4 block), ``bitshuffle``
(bitshuffle + LZ4 blocks, default block size), ``blosc`` (c-blosc 1 frames) and ``zlib``.

Chunks read straight out of an HDF5 file (pvapy's ``pvapy-ad-sim-server -hcm``) keep the
HDF5 filter's header in front of the payload: 8 bytes of big-endian uncompressed size and 4
of block size (bitshuffle filter 32008, LZ4 filter 32004, whose blocks each carry a 4-byte
compressed size).  NDPluginCodec never sends it; ``decompress`` recognises it by the size it
declares and reads both forms, so the user sets nothing.

Decoding is bounded: every codec writes at most the ``uncompressedSize`` the frame declares
(which the caller bounds with ``max_bytes``), so a small payload that would expand to
gigabytes (a decompression bomb) is refused after that many bytes, not allocated.
"""

from __future__ import annotations

import zlib

import bitshuffle
import blosc
import lz4.block
import numpy as np

# pvData ScalarType codes of the pixel types a detector frame may have (ScalarType enum:
# 0 boolean, 1 byte .. 4 long, 5 ubyte .. 8 ulong, 9 float, 10 double, 11 string)
SCALAR_TYPES: dict[int, np.dtype] = {
    1: np.dtype(np.int8),
    2: np.dtype(np.int16),
    3: np.dtype(np.int32),
    5: np.dtype(np.uint8),
    6: np.dtype(np.uint16),
    7: np.dtype(np.uint32),
    9: np.dtype(np.float32),
    10: np.dtype(np.float64),
}
SCALAR_TYPE_CODES = {dtype: code for code, dtype in SCALAR_TYPES.items()}
HDF5_HEADER = 12  # uncompressed size (uint64 BE) + block size (uint32 BE)
ZLIB_STEP = 1 << 16  # payload bytes fed to zlib at a time
BLOSC_HEADER = 16  # version, versionlz, flags, typesize, nbytes, blocksize, cbytes (LE)


class CodecError(ValueError):
    """A payload that cannot be decompressed into the frame it declares."""


def pixel_type(code) -> np.dtype:
    """The numpy dtype of a pvData ScalarType code, or CodecError naming what is accepted."""
    try:
        return SCALAR_TYPES[int(code)]
    except (KeyError, TypeError, ValueError):
        names = ", ".join(f"{c} {t}" for c, t in SCALAR_TYPES.items())
        raise CodecError(f"pixel type code {code!r} is not one of {names}") from None


def _hdf5_header(payload: np.ndarray, nbytes: int) -> int | None:
    """The block size (bytes) of an HDF5 filter header declaring ``nbytes``, else None."""
    if payload.size < HDF5_HEADER + 4:
        return None
    head = payload[:HDF5_HEADER].tobytes()
    if int.from_bytes(head[:8], "big") != nbytes:
        return None
    return int.from_bytes(head[8:12], "big")


def _lz4(payload: np.ndarray, nbytes: int, dtype: np.dtype) -> bytes:
    block = _hdf5_header(payload, nbytes)
    if block is None:  # a raw block: LZ4 stops with an error once nbytes are written
        return lz4.block.decompress(payload, uncompressed_size=nbytes)
    data, pos, parts = payload.tobytes(), HDF5_HEADER, []
    remaining = nbytes
    while remaining > 0:
        want = min(block or nbytes, remaining)
        size = int.from_bytes(data[pos : pos + 4], "big")
        chunk = data[pos + 4 : pos + 4 + size]
        if len(chunk) != size:
            raise CodecError("HDF5 LZ4 chunk ends inside a block")
        if size != want:  # the filter stores a block it cannot shrink as it is
            chunk = lz4.block.decompress(chunk, uncompressed_size=want)
        parts.append(chunk)
        pos, remaining = pos + 4 + size, remaining - want
    return b"".join(parts)


def _bslz4(payload: np.ndarray, nbytes: int, dtype: np.dtype) -> np.ndarray:
    block = _hdf5_header(payload, nbytes)
    if block is not None:
        payload, block = payload[HDF5_HEADER:], block // dtype.itemsize
    return bitshuffle.decompress_lz4(payload, (nbytes // dtype.itemsize,), dtype, block or 0)


def _blosc(payload: np.ndarray, nbytes: int, dtype: np.dtype) -> bytes:
    """c-blosc allocates what its header declares: the header is checked first."""
    if payload.size < BLOSC_HEADER:
        raise CodecError(f"blosc payload of {payload.size} bytes is shorter than its header")
    head = payload[:BLOSC_HEADER].tobytes()
    declared, total = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
    if declared != nbytes:
        raise CodecError(f"blosc header declares {declared} bytes, uncompressedSize says {nbytes}")
    if total != payload.size:
        raise CodecError(f"blosc header declares {total} compressed bytes, {payload.size} came")
    return blosc.decompress(payload)


def _zlib(payload: np.ndarray, nbytes: int, dtype: np.dtype) -> bytearray:
    """Fed in steps, each allowed one byte more than what is left of nbytes: a stream that
    goes past nbytes is refused at nbytes + 1, and no copy of the payload is made."""
    stream, view, out = zlib.decompressobj(), memoryview(payload), bytearray()
    for start in range(0, len(view), ZLIB_STEP):
        out += stream.decompress(view[start : start + ZLIB_STEP], nbytes + 1 - len(out))
        if len(out) > nbytes:
            raise CodecError(f"zlib payload decompresses to more than uncompressedSize {nbytes}")
        if stream.eof:
            break
    if not stream.eof:
        raise CodecError("zlib payload ends before its stream does")
    return out


_DECOMPRESS = {"lz4": _lz4, "bslz4": _bslz4, "blosc": _blosc, "zlib": _zlib}
CODECS = tuple(_DECOMPRESS)


def decompress(
    codec: str, payload: np.ndarray, dtype: np.dtype, nbytes: int, max_bytes: int | None = None
) -> np.ndarray:
    """The 1-D pixel array of ``nbytes`` bytes that ``payload`` (uint8) holds; at most
    ``nbytes`` (and ``max_bytes``) are ever written."""
    if codec not in _DECOMPRESS:
        raise CodecError(f"unknown codec {codec!r}; edgeloop decodes {list(CODECS)}")
    if nbytes <= 0 or nbytes % dtype.itemsize:
        raise CodecError(f"uncompressedSize {nbytes} is not a whole number of {dtype} pixels")
    if max_bytes is not None and nbytes > max_bytes:
        raise CodecError(f"uncompressedSize {nbytes} is above the limit of {max_bytes} bytes")
    try:
        out = _DECOMPRESS[codec](np.ascontiguousarray(payload, np.uint8), nbytes, dtype)
    except CodecError:
        raise
    except Exception as exc:  # each library raises its own kind of error on a bad payload
        raise CodecError(f"{codec} payload does not decompress: {exc}") from None
    out = (
        np.frombuffer(out, dtype)
        if isinstance(out, bytes | bytearray)
        else out.view(dtype).ravel()
    )
    if out.nbytes != nbytes:
        raise CodecError(
            f"{codec} payload decompressed to {out.nbytes} bytes, uncompressedSize says {nbytes}"
        )
    return out


def compress(codec: str, data: np.ndarray) -> np.ndarray:
    """``data``'s bytes compressed as NDPluginCodec would send them, as uint8."""
    data = np.ascontiguousarray(data)
    if codec == "lz4":
        raw = lz4.block.compress(data.tobytes(), store_size=False)
    elif codec == "bslz4":
        return bitshuffle.compress_lz4(data.ravel(), 0)
    elif codec == "blosc":
        raw = blosc.compress(data.tobytes(), data.dtype.itemsize, shuffle=blosc.SHUFFLE)
    elif codec == "zlib":
        raw = zlib.compress(data.tobytes(), 1)
    else:
        raise CodecError(f"unknown codec {codec!r}; edgeloop compresses {list(CODECS)}")
    return np.frombuffer(raw, np.uint8)
