"""Model files without pickle: the safetensors layout, and int8 packing of large tensors.

A file is ``u64 little-endian header size | JSON header | raw tensor bytes``; the header
maps each tensor name to ``{dtype, shape, data_offsets}`` and ``__metadata__`` holds string
values (we keep the model's JSON config there). It is the format of the ``safetensors``
library, which can read these files, but nothing here needs it: reading is ``json.loads``
and ``np.frombuffer``, so loading a model never executes code from the store.

int8 packing (``pack_int8``): a 2-D float tensor becomes per-row symmetric int8 values with
one fp16 scale per row; when the tensor is sparse (pruned), only the non-zero int8 values are
kept, with a bitmask of where they go (1 bit per element). A 50%-sparse d=16 embedding so
costs 0.5 + 0.125 (mask) + 2/16 (scales) = 0.75 byte per weight instead of 4. An int8 file
is written with ``dumps_packed`` (all tensors in one zlib-compressed blob, still a valid
safetensors file of two uint8 tensors).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "I8": np.int8,
    "U8": np.uint8,
    "I32": np.int32,
    "I64": np.int64,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _array(name: str, value: np.ndarray | torch.Tensor) -> np.ndarray:
    a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    a = np.ascontiguousarray(a)
    if a.dtype not in _NAMES:
        raise TypeError(f"{name}: dtype {a.dtype} cannot be stored")
    return a


def dumps(tensors: dict[str, np.ndarray | torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """Tensors (numpy or torch, any of F32 F16 I8 U8 I32 I64) and JSON-able metadata -> bytes."""
    header: dict[str, Any] = {"__metadata__": {k: json.dumps(v) for k, v in metadata.items()}}
    chunks, offset = [], 0
    for name, value in tensors.items():
        a = _array(name, value)
        raw = a.tobytes()
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def _header(data: bytes) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(tensor entries, metadata, where the tensor bytes start) of a model file."""
    if len(data) < 8:
        raise ValueError("not a model file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError("not a model file (header runs past the end)")
    header = json.loads(data[8 : 8 + n])
    meta = {k: json.loads(v) for k, v in header.pop("__metadata__", {}).items()}
    return header, meta, 8 + n


def metadata(data: bytes) -> dict[str, Any]:
    """The metadata of a model file, from its header alone (no tensor is read)."""
    return _header(data)[1]


def loads(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """bytes -> (tensors as numpy arrays, metadata). Raises ValueError on a damaged file."""
    header, meta, start_of_body = _header(data)
    body = memoryview(data)[start_of_body:]
    out = {}
    for name, h in header.items():
        start, end = h["data_offsets"]
        if end > len(body):
            raise ValueError(f"not a model file ({name} runs past the end)")
        a = np.frombuffer(body[start:end], dtype=_DTYPES[h["dtype"]])
        out[name] = a.reshape(h["shape"]).copy()
    if meta.pop("packed", False):
        try:
            index = json.loads(zlib.decompress(out["index"].tobytes()))
            blob = zlib.decompress(out["blob"].tobytes())
        except (KeyError, zlib.error) as e:
            raise ValueError(f"not a model file (damaged packed data: {e})") from None
        out = {
            name: np.frombuffer(blob[start:end], dtype=_DTYPES[dtype]).reshape(shape).copy()
            for name, (dtype, shape, start, end) in index.items()
        }
    return out, meta


def dumps_packed(tensors: dict[str, np.ndarray | torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """Like ``dumps``, with every tensor concatenated into one zlib-compressed ``blob`` and
    their index in a zlib-compressed ``index`` (per-tensor headers and the int8 values'
    redundancy cost bytes that matter at a student's size). ``loads`` reads both forms."""
    index, chunks, offset = {}, [], 0
    for name, value in tensors.items():
        a = _array(name, value)
        raw = a.tobytes()
        index[name] = [_NAMES[a.dtype], list(a.shape), offset, offset + len(raw)]
        chunks.append(raw)
        offset += len(raw)
    packed = {
        "index": np.frombuffer(zlib.compress(json.dumps(index).encode(), 9), dtype=np.uint8),
        "blob": np.frombuffer(zlib.compress(b"".join(chunks), 9), dtype=np.uint8),
    }
    return dumps(packed, {**metadata, "packed": True})


def save(path: str | Path, tensors: dict[str, Any], metadata: dict[str, Any]) -> int:
    """Write atomically; returns the bytes written (the size on disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dumps(tensors, metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return loads(Path(path).read_bytes())


def pack_int8(w: torch.Tensor) -> dict[str, np.ndarray]:
    """A 2-D float tensor -> {q (int8 values), scale (fp16 per row)[, mask (packed bits)]}.

    Zeros stay exactly zero (symmetric quantization), so a pruned tensor keeps its sparsity;
    the mask is kept only when it makes the tensor smaller."""
    a = w.detach().float().cpu().numpy()
    if a.ndim != 2:
        raise ValueError(f"pack_int8 takes a 2-D tensor, not {a.ndim}-D")
    amax = np.abs(a).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float16)
    q = np.clip(np.rint(a / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    nonzero = q != 0
    out: dict[str, np.ndarray] = {"scale": scale, "shape": np.array(a.shape, dtype=np.int64)}
    if nonzero.sum() + (nonzero.size + 7) // 8 < nonzero.size:
        out["mask"] = np.packbits(nonzero.ravel())
        out["q"] = q[nonzero]
    else:
        out["q"] = q
    return out


def unpack_int8(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """-> (int8 values (rows, cols), fp32 scale per row)."""
    rows, cols = (int(x) for x in p["shape"])
    if "mask" in p:
        nonzero = np.unpackbits(p["mask"], count=rows * cols).astype(bool)
        q = np.zeros(rows * cols, dtype=np.int8)
        q[nonzero] = p["q"]
        q = q.reshape(rows, cols)
    else:
        q = p["q"].reshape(rows, cols)
    return q, p["scale"].astype(np.float32)


def dequantize(p: dict[str, np.ndarray]) -> torch.Tensor:
    q, scale = unpack_int8(p)
    return torch.from_numpy(q.astype(np.float32) * scale[:, None])
