"""Decompression bombs: small NDPluginCodec payloads that expand to far more than the frame
they travel in declares (``bomb(codec, expands_to)``, ``bomb_frame(...)``).

Each is built without holding what it expands to: zlib from one flushed MiB of zeros, LZ4 as
a block written by hand (one literal, then one match whose length is spelled out in 255s),
blosc from zero pages that are never touched (``np.zeros`` maps them lazily)."""

import functools
import zlib

import blosc
import numpy as np

from edgeloop import ntnd

FRAME = (64, 64)  # what a bomb's frame declares: 64 x 64 uint16, 8192 bytes
GIB = 1 << 30
LZ4_MAX = 0x7E000000  # LZ4_MAX_INPUT_SIZE: the most one LZ4 block can describe


def _zlib(total: int) -> bytes:
    """zlib's stream of ``total`` zero bytes (a multiple of 1 MiB): after a full flush each
    MiB of zeros compresses to the same bytes, so one is repeated; the trailer is the
    Adler-32 of n zeros, (n mod 65521) << 16 | 1."""
    mib = 1 << 20
    if total % mib or total < 2 * mib:
        raise ValueError("a zlib bomb here expands to a whole number (>= 2) of MiB")
    stream, zeros = zlib.compressobj(9), bytes(mib)
    first = stream.compress(zeros) + stream.flush(zlib.Z_FULL_FLUSH)
    again = stream.compress(zeros) + stream.flush(zlib.Z_FULL_FLUSH)
    end = stream.flush()[:-4] + ((total % 65521) << 16 | 1).to_bytes(4, "big")
    return first + again * (total // mib - 1) + end


def _lz4(total: int) -> bytes:
    """A raw LZ4 block of ``total`` zero bytes: token, one literal, offset 1, the match
    length (total - 6 - 4) in 255s, then the five literals a block must end with."""
    match = total - 1 - 5
    extra = match - 4 - 15
    if extra < 0:
        raise ValueError("an LZ4 bomb expands to at least 25 bytes")
    length = b"\xff" * (extra // 255) + bytes([extra % 255])
    return b"\x1f\x00\x01\x00" + length + b"\x50" + bytes(5)


def _blosc(total: int) -> bytes:
    return blosc.compress(np.zeros(total, np.uint8), 1, shuffle=blosc.NOSHUFFLE)


@functools.cache
def bomb(codec: str, expands_to: int) -> np.ndarray:
    """The payload (uint8) that ``codec`` decompresses into ``expands_to`` zero bytes."""
    make = {"zlib": _zlib, "lz4": _lz4, "blosc": _blosc}[codec]
    return np.frombuffer(make(expands_to), np.uint8)


def bomb_frame(codec: str, expands_to: int, uid: int, declared: int | None = None):
    """An NTNDArray of a 64 x 64 uint16 frame whose payload is a bomb; it declares
    ``declared`` bytes uncompressed (the frame's 8192 by default)."""
    value = ntnd.build(np.zeros(FRAME, np.uint16), uid, codec=codec)
    payload = bomb(codec, expands_to)
    value["value"] = ("ubyteValue", payload)
    value["compressedSize"] = payload.size
    value["uncompressedSize"] = 2 * FRAME[0] * FRAME[1] if declared is None else declared
    return value
