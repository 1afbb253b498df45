"""NTNDArray the way areaDetector's PVA plugin (NDPluginPva) sends it: build, post, decode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from p4p import Value
from p4p.nt import NTNDArray

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
) -> Value:
    """A complete NTNDArray ``Value`` for a 2-D array (dimension[0] is x, the fastest axis)."""
    data = np.ascontiguousarray(data)
    if data.ndim != 2:
        raise FrameError(f"only 2-D (mono) arrays are published, got shape {data.shape}")
    code = data.dtype.char
    if code not in _CODE2UNION:
        raise FrameError(f"dtype {data.dtype} has no NTNDArray union member")
    t = time.time() if timestamp is None else timestamp
    attrs = {"ColorMode": 0}
    attrs.update(attributes or {})
    return Value(
        _ND_TYPE,
        {
            "value": (_CODE2UNION[code], data.ravel()),
            "codec": {"name": ""},
            "compressedSize": data.nbytes,
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


def decode(value: Value, received: float | None = None) -> Frame:
    """Frame from an NTNDArray ``Value``; raises FrameError with the reason when unusable."""
    codec = value.get("codec.name", "") or ""
    if codec not in ("", "none"):
        raise FrameError(
            f"compressed frames (codec {codec!r}) are not supported; "
            "disable NDPluginCodec or send uncompressed"
        )
    flat = value.get("value")
    if flat is None or not hasattr(flat, "shape"):
        raise FrameError("frame has no pixel data")
    dims = [d["size"] for d in value.get("dimension", [])]
    if len(dims) != 2:
        raise FrameError(f"expected a 2-D mono frame, got dimension sizes {dims}")
    ny, nx = dims[1], dims[0]
    if ny <= 0 or nx <= 0 or ny * nx != flat.size:
        raise FrameError(f"dimension {nx}x{ny} does not match {flat.size} pixels")
    attrs = {}
    for a in value.get("attribute", []):
        attrs[a["name"]] = a["value"]
    ts = value.get("timeStamp")
    stamp = ts["secondsPastEpoch"] + ts["nanoseconds"] * 1e-9 if ts is not None else 0.0
    return Frame(
        data=flat.reshape(ny, nx),
        unique_id=int(value.get("uniqueId", 0)),
        timestamp=stamp,
        attributes=attrs,
        received=time.time() if received is None else received,
    )
