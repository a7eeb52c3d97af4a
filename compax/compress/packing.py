"""Arrays packed into few bytes for saving: integer codes, two 4-bit codes a byte, bitmasks.

A saved variant (`store.py`) holds the leaves of its pytree packed into one uint8 buffer (`pack`),
each leaf as named byte strings ("parts") in the smallest of these encodings that decodes to the
leaf bit for bit (same dtype, shape and bytes; checked when packing), `raw` where no other is
both exact and smaller:

    raw         the leaf's bytes in its dtype, C order (every leaf that is not float32)
    mask        `mask`: np.packbits of (x != 0) over the flattened leaf (first entry in the
                high bit, zero bits pad the last byte); `values`: the non-zero entries, float32
    codes       a kernel quantized symmetrically with zero point 0 whose values are exactly
                float32(q) * s, s its scale (another leaf: one per output channel, the last axis,
                or one per kernel; `scale`), as `quant.dequantize` computes them: `codes`, the
                integer codes q of every entry as int8 (5 to 8 bits) or two to a byte (2 to 4
                bits: the first in the low nibble, two's complement, a zero nibble pads an odd
                count)
    mask+codes  `mask` as above, and `codes` of the non-zero entries only (a pruned, then
                quantized kernel)

Fake quantization makes -0.0 (negative weights that round to code 0) and pruning may: `mask` and
`codes` keep no sign of zero, so where a zero entry is negative, `zero_signs` holds np.packbits of
the sign bits of all zero entries, in order, and decoding gives each its sign.

`pack` returns the buffer and its layout (JSON): per leaf {"shape", "dtype", "parts": {name:
[offset, bytes]}}, with "bits" and "scale": [index of the scale leaf, the shape it is reshaped to
so that it broadcasts along the kernel] for codes; `unpack` gives the leaves back. Pure numpy.
"""

import math

import ml_dtypes
import numpy as np


def _bytes(a) -> np.ndarray:
    """The bytes of array `a` in C order, as a flat uint8 array."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _dtype(name: str) -> np.dtype:
    """The numpy dtype named `name` (`np.dtype(...).name`), bfloat16 and the other ml_dtypes
    included."""
    return np.dtype(getattr(ml_dtypes, name, name))


def _codes(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray | None:
    """The int8 codes round(x / scale) of `x`, None where one is outside the signed `bits` range
    (or not finite: x off the grid of this scale)."""
    with np.errstate(all="ignore"):
        q = np.rint(x / scale)
    if not np.all((q >= -(2 ** (bits - 1))) & (q <= 2 ** (bits - 1) - 1)):
        return None
    return q.astype(np.int8).reshape(-1)


def _pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes `q` as bytes: one a byte for 5 to 8 bits, two a byte (low nibble first) below."""
    if bits > 4:
        return _bytes(q)
    nibbles = np.zeros(q.size + q.size % 2, np.uint8)
    nibbles[:q.size] = q.view(np.uint8) & 0xF
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_codes(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` int8 codes that `_pack_codes` wrote as `data`."""
    if bits > 4:
        return data.view(np.int8)[:count]
    nibbles = np.stack([data & 0xF, data >> 4], axis=1).reshape(-1)[:count].view(np.int8)
    return (nibbles ^ 8) - 8  # sign-extends the 4-bit two's complement


def encode(x, scale=None, bits: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(parts, description) of the array `x`: its smallest encoding (module doc) whose `decode`
    is `x` bit for bit. A quantized kernel gives its `scale`, broadcastable along `x`, and its
    `bits`. The parts are flat uint8 arrays; the description holds "shape", "dtype" and, for
    codes, "bits"."""
    x = np.ascontiguousarray(x)
    description = {"shape": list(x.shape), "dtype": x.dtype.name}
    raw = {"raw": _bytes(x)}
    if x.dtype != np.float32 or not x.size:
        return raw, description
    flat = x.reshape(-1)
    nonzero = flat != 0
    negative_zero = (flat.view(np.uint32) >> 31).astype(bool)[~nonzero]
    signs = {"zero_signs": np.packbits(negative_zero)} if negative_zero.any() else {}
    mask = {"mask": np.packbits(nonzero)}
    candidates = [({**mask, "values": _bytes(flat[nonzero]), **signs}, description)]
    if scale is not None:
        codes = _codes(x, np.broadcast_to(np.asarray(scale, np.float32), x.shape), bits)
        if codes is not None:
            quantized = {**description, "bits": bits}
            candidates += [({"codes": _pack_codes(codes, bits), **signs}, quantized),
                           ({**mask, "codes": _pack_codes(codes[nonzero], bits), **signs},
                            quantized)]
    for parts, how in sorted(candidates, key=lambda c: sum(p.size for p in c[0].values())):
        if sum(p.size for p in parts.values()) >= x.nbytes:
            break
        back = decode(parts, how, scale)
        if back.dtype == x.dtype and back.shape == x.shape and back.tobytes() == x.tobytes():
            return parts, how
    return raw, description


def decode(parts: dict[str, np.ndarray], description: dict, scale=None) -> np.ndarray:
    """The array that `encode` made `parts` (uint8 arrays) and `description` of; `scale` (for
    codes) broadcastable along it."""
    shape, dtype = tuple(description["shape"]), _dtype(description["dtype"])
    if "raw" in parts:
        return np.frombuffer(parts["raw"].tobytes(), dtype).reshape(shape)
    size = math.prod(shape)
    kept = np.unpackbits(parts["mask"], count=size).astype(bool) if "mask" in parts else None
    if "codes" in parts:
        codes = _unpack_codes(parts["codes"], description["bits"],
                              size if kept is None else int(kept.sum()))
        if kept is not None:
            full = np.zeros(size, np.int8)
            full[kept] = codes
            codes = full
        flat = (codes.reshape(shape).astype(np.float32)
                * np.asarray(scale, np.float32)).reshape(-1)
    else:
        flat = np.zeros(size, dtype)
        flat[kept] = np.frombuffer(parts["values"].tobytes(), dtype)
    if "zero_signs" in parts:
        zero = flat == 0
        negative = np.unpackbits(parts["zero_signs"], count=int(zero.sum())).astype(bool)
        flat[zero] = np.where(negative, -0.0, 0.0).astype(dtype)
    return flat.reshape(shape)


def pack(leaves, scales: dict[int, tuple[int, tuple[int, ...], int]] | None = None
         ) -> tuple[np.ndarray, list[dict]]:
    """(buffer, layout): every array of `leaves` encoded (`encode`) and its parts joined in one
    uint8 buffer; the layout (JSON) holds each leaf's description with the [offset, bytes] of its
    parts. `scales`: {index of a quantized kernel: (index of its scale leaf, the shape the scale
    is reshaped to so that it broadcasts along the kernel, bits)}."""
    leaves = [np.asarray(x) for x in leaves]
    chunks, layout, offset = [], [], 0
    for i, x in enumerate(leaves):
        if i in (scales or {}):
            j, shape, bits = scales[i]
            parts, how = encode(x, leaves[j].reshape(shape), bits)
            if "codes" in parts:
                how = {**how, "scale": [j, list(shape)]}
        else:
            parts, how = encode(x)
        how = {**how, "parts": {}}
        for name, part in parts.items():
            how["parts"][name] = [offset, part.size]
            chunks.append(part)
            offset += part.size
        layout.append(how)
    return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8), layout


def unpack(buffer: np.ndarray, layout: list[dict]) -> list[np.ndarray]:
    """The leaves that `pack` joined in `buffer` with `layout`."""
    buffer = np.asarray(buffer, np.uint8)
    leaves = [None] * len(layout)
    for i in sorted(range(len(layout)), key=lambda i: "scale" in layout[i]):  # scales first
        how = layout[i]
        parts = {name: buffer[start:start + size] for name, (start, size) in how["parts"].items()}
        scale = None
        if "scale" in how:
            j, shape = how["scale"]
            scale = leaves[j].reshape(shape)
        leaves[i] = decode(parts, how, scale)
    return leaves
