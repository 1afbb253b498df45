"""NTNDArray the way areaDetector's PVA plugin (NDPluginPva) sends it: build, post, decode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from p4p import Value
from p4p.nt import NTNDArray

from edgeloop import codecs

_CODE2UNION = NTNDArray._code2u
_ND_TYPE = NTNDArray.buildType()


class FrameError(ValueError):
    """A frame that cannot be used: bad shape, unsupported codec, empty or inconsistent data."""


@dataclass
class Frame:
    data: np.ndarray
    unique_id: int
    timestamp: float
    attributes: dict = field(default_factory=dict)
    received: float = 0.0
    new_acquisition: bool = False  # the source's uniqueId counter restarted with this frame
    settled: bool = False  # counted by the edge: answered or refused
    handed_over: bool = False  # to the edge's publishing thread, which settles it


def epoch_seconds(value) -> float:
    """A pvData value's ``timeStamp`` as seconds since 1970 (0.0 where it has none)."""
    ts = value.get("timeStamp")
    return ts["secondsPastEpoch"] + ts["nanoseconds"] * 1e-9 if ts is not None else 0.0


def _stamp(t: float) -> dict:
    sec = int(t)
    return {"secondsPastEpoch": sec, "nanoseconds": int((t - sec) * 1e9)}


def _attribute(name: str, value) -> dict:
    return {"name": name, "value": value, "descriptor": "", "sourceType": 0, "source": ""}


def build(
    data: np.ndarray,
    unique_id: int,
    attributes: dict | None = None,
    timestamp: float | None = None,
    codec: str = "",
) -> Value:
    """A complete NTNDArray ``Value`` for a 2-D array (dimension[0] is x, the fastest axis),
    compressed with ``codec`` (one of ``codecs.CODECS``) as NDPluginCodec sends it."""
    data = np.ascontiguousarray(data)
    if data.ndim != 2:
        raise FrameError(f"only 2-D (mono) arrays are published, got shape {data.shape}")
    code = data.dtype.char
    if code not in _CODE2UNION:
        raise FrameError(f"dtype {data.dtype} has no NTNDArray union member")
    t = time.time() if timestamp is None else timestamp
    attrs = {"ColorMode": 0}
    attrs.update(attributes or {})
    if codec:
        payload = codecs.compress(codec, data)
        value = ("ubyteValue", payload)
        # an int32 ScalarType code on areaDetector; p4p sends a Python int as int64
        codec_field = {"name": codec, "parameters": codecs.SCALAR_TYPE_CODES[data.dtype]}
    else:
        payload, value, codec_field = data, (_CODE2UNION[code], data.ravel()), {"name": ""}
    return Value(
        _ND_TYPE,
        {
            "value": value,
            "codec": codec_field,
            "compressedSize": payload.nbytes,
            "uncompressedSize": data.nbytes,
            "uniqueId": int(unique_id),
            "dataTimeStamp": _stamp(t),
            "timeStamp": _stamp(t),
            "dimension": [
                {"size": n, "offset": 0, "fullSize": n, "binning": 1, "reverse": False}
                for n in reversed(data.shape)
            ],
            "attribute": [_attribute(k, v) for k, v in attrs.items()],
        },
    )


def _pixels(value: Value, max_bytes: int | None) -> np.ndarray:
    """The frame's pixels as a 1-D array, decompressed when a codec is named."""
    flat = value.get("value")
    if flat is None or not hasattr(flat, "dtype"):
        raise FrameError("frame has no pixel data")
    codec = value.get("codec.name", "") or ""
    if codec in ("", "none"):
        if flat.dtype not in codecs.SCALAR_TYPE_CODES:
            raise FrameError(f"pixel type {flat.dtype} is not supported")
        return flat
    if flat.dtype != np.uint8:
        raise FrameError(f"{codec} frame holds {flat.dtype} data, not bytes in ubyteValue")
    declared = int(value.get("compressedSize", 0) or 0)
    if declared and declared != flat.size:
        raise FrameError(f"compressedSize {declared} but {flat.size} bytes arrived")
    params = value.get("codec.parameters")
    try:
        dtype = codecs.pixel_type(params["value"] if isinstance(params, Value) else params)
        declared_bytes = int(value.get("uncompressedSize", 0))
        pixels = codecs.decompress(codec, flat, dtype, declared_bytes, max_bytes)
    except codecs.CodecError as exc:
        raise FrameError(str(exc)) from None
    return pixels


def payload_bytes(value: Value) -> int:
    """The most bytes a frame holds or declares (its payload, its uncompressedSize, its
    dimensions times its pixel size): what a byte limit is checked against, before decoding."""
    flat = value.get("value")
    held = int(getattr(flat, "nbytes", 0))
    itemsize = int(getattr(getattr(flat, "dtype", None), "itemsize", 1))
    declared = int(value.get("uncompressedSize", 0) or 0)
    pixels = 1
    for d in value.get("dimension", []):
        pixels *= max(int(d["size"]), 0)
    return max(held, declared, pixels * itemsize)


def decode(value: Value, received: float | None = None, max_bytes: int | None = None) -> Frame:
    """Frame from an NTNDArray ``Value`` (plain or NDPluginCodec-compressed); raises
    FrameError with the reason when unusable, whatever the value holds, and for a frame that
    holds or declares more than ``max_bytes`` (before anything is decompressed)."""
    try:
        if max_bytes is not None and (size := payload_bytes(value)) > max_bytes:
            raise FrameError(f"{size} bytes, above the limit of {max_bytes}")
        return _decode(value, received, max_bytes)
    except FrameError:
        raise
    except Exception as exc:  # a structure that is not an NTNDArray, or a damaged one
        raise FrameError(f"malformed NTNDArray: {type(exc).__name__}: {exc}") from None


def _decode(value: Value, received: float | None, max_bytes: int | None) -> Frame:
    attrs = {}
    for a in value.get("attribute", []):
        attrs[a["name"]] = a["value"]
    dims = [int(d["size"]) for d in value.get("dimension", [])]
    if len(dims) == 3:
        raise FrameError(
            f"colour frames are not supported (dimension sizes {dims}, ColorMode "
            f"{attrs.get('ColorMode', '?')}); send mono frames (ColorMode 0)"
        )
    if len(dims) != 2:
        raise FrameError(f"expected a 2-D mono frame, got dimension sizes {dims}")
    ny, nx = dims[1], dims[0]
    flat = _pixels(value, max_bytes)
    if ny <= 0 or nx <= 0 or ny * nx != flat.size:
        raise FrameError(f"dimension {nx}x{ny} does not match {flat.size} pixels")
    stamp = epoch_seconds(value)
    return Frame(
        data=flat.reshape(ny, nx),
        unique_id=int(value.get("uniqueId", 0)),
        timestamp=stamp,
        attributes=attrs,
        received=time.time() if received is None else received,  # or the caller's clock
    )
