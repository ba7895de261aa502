"""Bit packing and block-wise absmax quantization (uniform and sqrt levels), with fp16 scales relative to one
float32 global scale: the numeric kernels every quantizing codec uses."""

from __future__ import annotations

import numpy as np

F32 = np.float32





# ================================================================================================
# bit packing and block quantization (vectorised)
# ================================================================================================
def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (< 2**bits, length a multiple of 8) into bytes, little-endian within each group.

    bits 1, 2, 4, 8 pack whole codes per byte; other widths pack 8 codes into ``bits`` bytes (via uint64)."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return c
    if 8 % bits:
        g = c.reshape(-1, 8).astype(np.uint64)
        v = g[:, 0].copy()
        for i in range(1, 8):
            v |= g[:, i] << np.uint64(bits * i)
        return np.ascontiguousarray(v.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]).reshape(-1)
    per = 8 // bits
    g = c.reshape(-1, per)
    out = g[:, 0].copy()
    for i in range(1, per):
        out |= g[:, i] << np.uint8(bits * i)
    return out


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` uint8 codes."""
    p = np.ascontiguousarray(packed, dtype=np.uint8)
    if bits == 8:
        return p[:n]
    if 8 % bits:
        b = np.zeros((p.size // bits, 8), np.uint8)
        b[:, :bits] = p.reshape(-1, bits)
        v = b.view("<u8").reshape(-1)
        out = np.empty((v.size, 8), np.uint8)
        mask = np.uint64((1 << bits) - 1)
        for i in range(8):
            out[:, i] = (v >> np.uint64(bits * i)) & mask
        return out.reshape(-1)[:n]
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((p.size, per), np.uint8)
    for i in range(per):
        np.bitwise_and(p >> np.uint8(bits * i), mask, out=out[:, i])
    return out.reshape(-1)[:n]


def _check_finite(x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise ValueError("codecs refuse non-finite input (NaN/inf): fix the producer")


def _gscale(x: np.ndarray) -> float:
    m = float(np.abs(x).max(initial=0.0))
    return m if m > 0.0 else 1.0


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x (n,) float32 → (ceil(n/block), block), zero-padded."""
    nb = -(-x.size // block)
    if nb * block == x.size:
        return x.reshape(nb, block)
    xb = np.zeros(nb * block, F32)
    xb[: x.size] = x
    return xb.reshape(nb, block)


def _block_scales(xb: np.ndarray, bits: int, gscale: float) -> np.ndarray:
    """fp16 relative scale per block: the signed largest-magnitude value / −2^(bits−1), over gscale."""
    idx = np.abs(xb).argmax(axis=1)
    m = xb[np.arange(xb.shape[0]), idx]
    return (m * F32(-1.0 / (gscale * (1 << (bits - 1))))).astype(np.float16)


def _quantize(
    xb: np.ndarray, s16: np.ndarray, bits: int, gscale: float, rng: np.random.Generator | None
) -> np.ndarray:
    """Codes (nb, block) uint8 for blocks ``xb`` with fp16 relative scales ``s16``."""
    d = s16.astype(F32) * F32(gscale)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
    y = xb * inv[:, None]
    half = 1 << (bits - 1)
    if rng is None:
        np.rint(y, out=y)
    else:  # stochastic rounding: floor(y + u), u ~ U[0, 1): unbiased
        y += rng.random(y.shape, dtype=F32)
        np.floor(y, out=y)
    y += F32(half)
    np.clip(y, 0, (1 << bits) - 1, out=y)
    return y.astype(np.uint8)


def _dequantize(codes: np.ndarray, s16: np.ndarray, bits: int, gscale: float) -> np.ndarray:
    """Values (nb, block) float32 from codes (nb, block) and fp16 relative scales."""
    d = s16.astype(F32) * F32(gscale)
    y = codes.astype(F32)
    y -= F32(1 << (bits - 1))
    y *= d[:, None]
    return y


def _quantize_sqrt(xb: np.ndarray, bits: int, gscale: float) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 relative |absmax| scales, codes): code k ↔ c = 2k/(2^bits − 1) − 1, value = c·|c|·scale."""
    top = (1 << bits) - 1
    a = np.abs(xb)
    amax = a[np.arange(xb.shape[0]), a.argmax(axis=1)] if xb.shape[0] else np.zeros(0, F32)
    s16 = (amax * F32(1.0 / gscale)).astype(np.float16)
    d = s16.astype(F32) * F32(gscale)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
    a *= inv[:, None]
    np.sqrt(a, out=a)
    np.copysign(a, xb, out=a)  # c = sign(u)·sqrt(|u|) ∈ [-1, 1]
    a += F32(1.0)
    a *= F32(top / 2.0)
    np.rint(a, out=a)
    np.clip(a, 0, top, out=a)
    return s16, a.astype(np.uint8)


def _dequantize_sqrt(codes: np.ndarray, s16: np.ndarray, bits: int, gscale: float) -> np.ndarray:
    top = (1 << bits) - 1
    c = codes.astype(F32)
    c *= F32(2.0 / top)
    c -= F32(1.0)
    y = np.abs(c)
    y *= c
    y *= (s16.astype(F32) * F32(gscale))[:, None]
    return y
