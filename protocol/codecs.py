"""Array codecs for the downlink (and any dense array): a registry of name → encoder/decoder.

Every :class:`EncodedArray` is self-describing: codec name, parameters, shape and dtype travel with the
payload, so a decoder needs nothing else (DESIGN.md, "Compression").

Codecs (registry names):

* ``fp32``: raw float32. ``fp16``: float16 of ``x / gscale`` (gscale = max|x|, so no overflow/underflow).
* ``absmax``: block-wise absmax quantization at 2, 3, 4, 5, 6 or 8 bits, one fp16 scale per block (GGUF Q4_0
  style: the block's largest-magnitude value maps exactly onto the most negative level, so all 2^bits levels
  are used and 0 is exact), codes bit-packed; optional stochastic rounding with an explicit Generator.
  ``levels="sqrt"`` spaces the levels uniformly in sign·sqrt(|x|/absmax) instead: better for heavy tails.
  Shortcuts: ``"q2"`` … ``"q6"``, ``"q8"``; with sqrt levels ``"q2s"`` … ``"q8s"``.
* ``topk``: the k largest-magnitude values (sorted uint32 indices + values); :class:`ErrorFeedback` keeps the
  sender-side residual.
* ``adaptive``: per chunk of ``chunk`` values, one of the bit widths ``bits`` (2, 3, 4, 5, 6, 8 quantized; 16 = fp16,
  32 = raw). Mode A (``target``): the fewest bits whose relative L2 error on the chunk is ≤ target.
  Mode B (``budget``): the allocation minimising total squared error within a payload byte budget
  (greedy on each chunk's lower convex hull of (bytes, error), i.e. largest marginal gain per byte first).

Per-block scales are stored as fp16 *relative to one float32 global scale* (``gscale`` = max|x|), because
gradients can be far below fp16's smallest normal (6e-5): relative scales keep fp16's precision wherever a
block matters (a block below 6e-8·max|x| is negligible and rounds to zero).

Non-finite values: every codec *rejects* NaN/±inf at encode time (ValueError: a NaN in a gradient is an
upstream bug, and one inf would poison a whole block's scale). A received payload with non-finite scales or
values is refused at decode time (:class:`~protocol.errors.CodecError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.constants import (
    DEFAULT_LIMITS,
    ENC_CODEC,
    ENC_DTYPE,
    ENC_KEYS,
    ENC_PARAMS,
    ENC_PARTS,
    ENC_SHAPE,
    Limits,
)
from protocol.errors import CodecError, LimitExceeded

F32 = np.float32
QUANT_BITS = (2, 3, 4, 5, 6, 8)
ADAPTIVE_BITS = (2, 3, 4, 5, 6, 8, 16, 32)
BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
LEVELS = ("uniform", "sqrt")
DTYPES = ("float16", "float32", "float64")
MAX_CHUNK = 1 << 24


# ================================================================================================
# EncodedArray
# ================================================================================================
@dataclass(frozen=True)
class EncodedArray:
    """A compressed array: ``codec`` + ``params`` + ``shape`` + ``dtype`` + named payload ``parts``.

    Construction validates everything (payload sizes against the declared shape, finite scales), so
    :meth:`decode` cannot fail and never allocates more than ``prod(shape)`` elements.
    """

    codec: str
    shape: tuple[int, ...]
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = CODECS.get(self.codec)
        if c is None:
            raise CodecError(f"unknown codec {self.codec!r}; known: {sorted(CODECS)}")
        if self.dtype not in DTYPES:
            raise CodecError(f"{self.codec}: dtype {self.dtype!r} not one of {DTYPES}")
        if not all(isinstance(n, int) and n >= 0 for n in self.shape):
            raise CodecError(f"{self.codec}: bad shape {self.shape}")
        c.validate(self.size, self.params, self.parts)

    @property
    def size(self) -> int:
        """Number of elements once decoded."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Payload bytes (the parts; the few bytes of header/params are not counted)."""
        return int(sum(p.nbytes for p in self.parts.values()))

    def decode(self) -> np.ndarray:
        """The decoded array, with the original shape and dtype."""
        out = CODECS[self.codec].decode(self.size, self.params, self.parts)
        return out.astype(self.dtype, copy=False).reshape(self.shape)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this array (parts travel as ndarray ext types)."""
        return {
            ENC_CODEC: self.codec,
            ENC_SHAPE: list(self.shape),
            ENC_DTYPE: self.dtype,
            ENC_PARAMS: dict(self.params),
            ENC_PARTS: dict(self.parts),
        }

    @classmethod
    def from_wire(cls, obj: Any, limits: Limits = DEFAULT_LIMITS, where: str = "array") -> EncodedArray:
        """Validate a received map and build the EncodedArray; raises CodecError / LimitExceeded."""
        if not isinstance(obj, dict):
            raise CodecError(f"{where}: a compressed array must be a map, got {type(obj).__name__}")
        if set(obj) != set(ENC_KEYS):
            raise CodecError(f"{where}: compressed array keys {sorted(map(str, obj))} != {sorted(ENC_KEYS)}")
        codec, shape, dtype = obj[ENC_CODEC], obj[ENC_SHAPE], obj[ENC_DTYPE]
        params, parts = obj[ENC_PARAMS], obj[ENC_PARTS]
        if not isinstance(codec, str) or not isinstance(dtype, str):
            raise CodecError(f"{where}: codec and dtype must be strings")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise LimitExceeded(f"{where}: shape must be a list of at most {limits.max_ndim} dims")
        if not all(type(n) is int and 0 <= n for n in shape):
            raise CodecError(f"{where}: shape {shape} must hold non-negative ints")
        n = math.prod(shape)
        if n > limits.max_elements:
            raise LimitExceeded(f"{where}: shape {shape} declares {n} elements > limit {limits.max_elements}")
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and type(v) in (int, float, bool, str) for k, v in params.items()
        ):
            raise CodecError(f"{where}: params must be a flat map of scalars")
        if not isinstance(parts, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) and v.ndim == 1 for k, v in parts.items()
        ):
            raise CodecError(f"{where}: parts must map names to 1-d arrays")
        try:
            return cls(codec=codec, shape=tuple(shape), dtype=dtype, params=params, parts=parts)
        except CodecError as e:
            raise CodecError(f"{where}: {e}") from None


# ================================================================================================
# configs
# ================================================================================================
@dataclass(frozen=True)
class RawConfig:
    """fp32 raw (lossless for float32 input)."""

    codec: str = field(default="fp32", init=False)


@dataclass(frozen=True)
class Fp16Config:
    """float16 passthrough (relative to a float32 global scale)."""

    codec: str = field(default="fp16", init=False)


@dataclass(frozen=True)
class QuantConfig:
    """Block-wise absmax quantization: ``bits`` ∈ {2, 3, 4, 5, 6, 8}, ``block`` values per fp16 scale.

    ``stochastic``: unbiased stochastic rounding (needs an explicit ``rng`` at encode time).
    ``levels``: "uniform" (GGUF-style, 0 exact) or "sqrt": 2^bits levels uniform in sign(u)·sqrt(|u|),
    u = x / block absmax, i.e. denser near zero, which suits heavy-tailed gradients (student-t df=3 at
    4 bits: cosine 0.987 → 0.993 for the same bytes). Stochastic rounding is uniform-only.
    """

    bits: int = 4
    block: int = 64
    stochastic: bool = False
    levels: str = "uniform"
    codec: str = field(default="absmax", init=False)

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"QuantConfig.bits must be one of {QUANT_BITS}, got {self.bits}")
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"QuantConfig.block must be one of {BLOCK_SIZES}, got {self.block}")
        if self.levels not in LEVELS:
            raise ValueError(f"QuantConfig.levels must be one of {LEVELS}, got {self.levels!r}")
        if self.stochastic and self.levels != "uniform":
            raise ValueError("stochastic rounding is only unbiased with uniform levels")


@dataclass(frozen=True)
class TopKConfig:
    """Keep the ``k`` (or ``ratio``·n, rounded up) largest-magnitude values; ``values``: "fp32" or "fp16"."""

    k: int | None = None
    ratio: float | None = None
    values: str = "fp32"
    codec: str = field(default="topk", init=False)

    def __post_init__(self) -> None:
        if (self.k is None) == (self.ratio is None):
            raise ValueError("TopKConfig needs exactly one of k and ratio")
        if self.k is not None and self.k < 0:
            raise ValueError(f"TopKConfig.k must be >= 0, got {self.k}")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"TopKConfig.ratio must be in [0, 1], got {self.ratio}")
        if self.values not in ("fp32", "fp16"):
            raise ValueError(f"TopKConfig.values must be 'fp32' or 'fp16', got {self.values!r}")

    def k_for(self, n: int) -> int:
        return min(n, self.k if self.k is not None else math.ceil(float(self.ratio or 0.0) * n))


@dataclass(frozen=True)
class AdaptiveConfig:
    """Adaptive bits per chunk: mode A (``target`` relative L2 error per chunk) or mode B (``budget`` bytes).

    ``chunk`` must be a multiple of ``block``; ``bits`` ⊆ {2, 3, 4, 5, 6, 8, 16, 32} (16: fp16, 32: raw float32).
    Mode A chooses by binary search over ``bits`` (error falls as bits grow); the last width is the fallback,
    so with 32 in ``bits`` (the default) every chunk meets any target. Mode B measures the error of every
    width ≤ 4 bits and of the widest quantized width exactly, interpolates the ones in between (6 dB per
    bit) and models fp16's rounding noise, which halves its cost; ``measure_all=True`` measures every
    width. The budget is exact either way.
    """

    target: float | None = None
    budget: int | None = None
    chunk: int = 4096
    block: int = 64
    bits: tuple[int, ...] = ADAPTIVE_BITS
    stochastic: bool = False
    measure_all: bool = False
    codec: str = field(default="adaptive", init=False)

    def __post_init__(self) -> None:
        if (self.target is None) == (self.budget is None):
            raise ValueError("AdaptiveConfig needs exactly one of target (mode A) and budget (mode B)")
        if self.target is not None and not (math.isfinite(self.target) and self.target >= 0):
            raise ValueError(f"AdaptiveConfig.target must be a finite relative error >= 0, got {self.target}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"AdaptiveConfig.budget must be >= 0 bytes, got {self.budget}")
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"AdaptiveConfig.block must be one of {BLOCK_SIZES}, got {self.block}")
        if not 0 < self.chunk <= MAX_CHUNK or self.chunk % self.block:
            raise ValueError(f"AdaptiveConfig.chunk must be a positive multiple of block, got {self.chunk}")
        bits = tuple(sorted(set(self.bits)))
        if not bits or not set(bits) <= set(ADAPTIVE_BITS):
            raise ValueError(f"AdaptiveConfig.bits must be a non-empty subset of {ADAPTIVE_BITS}, got {self.bits}")
        object.__setattr__(self, "bits", bits)

    @property
    def mode(self) -> str:
        return "A" if self.target is not None else "B"


CodecConfig = RawConfig | Fp16Config | QuantConfig | TopKConfig | AdaptiveConfig

SHORTCUTS: dict[str, Callable[[], CodecConfig]] = {
    "fp32": RawConfig,
    "raw": RawConfig,
    "fp16": Fp16Config,
    "q2": lambda: QuantConfig(bits=2),
    "q3": lambda: QuantConfig(bits=3),
    "q4": lambda: QuantConfig(bits=4),
    "q5": lambda: QuantConfig(bits=5),
    "q6": lambda: QuantConfig(bits=6),
    "q8": lambda: QuantConfig(bits=8),
    **{f"q{b}s": (lambda b=b: QuantConfig(bits=b, levels="sqrt")) for b in QUANT_BITS},
}


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


# ================================================================================================
# codecs
# ================================================================================================
def _p_int(params: Mapping[str, Any], key: str, allowed: tuple[int, ...] | None = None) -> int:
    v = params.get(key)
    if type(v) is not int or (allowed is not None and v not in allowed):
        raise CodecError(f"param {key!r} = {v!r} must be an int{'' if allowed is None else f' in {allowed}'}")
    return v


def _p_scale(params: Mapping[str, Any]) -> float:
    v = params.get("gscale")
    if type(v) is not float or not (math.isfinite(v) and v > 0):
        raise CodecError(f"param 'gscale' = {v!r} must be a finite positive float")
    return v


def _p_keys(params: Mapping[str, Any], keys: set[str]) -> None:
    if set(params) != keys:
        raise CodecError(f"params {sorted(params)} != expected {sorted(keys)}")


def _part(parts: Mapping[str, np.ndarray], name: str, dtype: Any, size: int) -> np.ndarray:
    a = parts.get(name)
    if a is None or a.dtype != np.dtype(dtype) or a.ndim != 1 or a.size != size:
        got = "missing" if a is None else f"{a.dtype}{a.shape}"
        raise CodecError(f"part {name!r} must be {np.dtype(dtype)} of {size} elements, got {got}")
    return a


def _parts_keys(parts: Mapping[str, np.ndarray], keys: set[str]) -> None:
    if set(parts) != keys:
        raise CodecError(f"parts {sorted(parts)} != expected {sorted(keys)}")


class Codec:
    """A registry entry. ``encode`` returns (params, parts); ``validate`` must reject anything ``decode`` can't
    handle, without allocating more than the payload; ``decode`` returns float32 (n,)."""

    name = ""

    def encode(self, x: np.ndarray, cfg: Any, rng: np.random.Generator | None) -> tuple[dict, dict]:
        raise NotImplementedError

    def validate(self, n: int, params: Mapping[str, Any], parts: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError

    def decode(self, n: int, params: Mapping[str, Any], parts: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class RawCodec(Codec):
    name = "fp32"

    def encode(self, x, cfg, rng):
        return {}, {"x": np.array(x, dtype=F32)}

    def validate(self, n, params, parts):
        _p_keys(params, set())
        _parts_keys(parts, {"x"})
        if not np.isfinite(_part(parts, "x", F32, n)).all():
            raise CodecError("fp32 payload holds non-finite values")

    def decode(self, n, params, parts):
        return parts["x"].astype(F32, copy=True)


class Fp16Codec(Codec):
    name = "fp16"

    def encode(self, x, cfg, rng):
        g = _gscale(x)
        return {"gscale": g}, {"x": (x * F32(1.0 / g)).astype(np.float16)}

    def validate(self, n, params, parts):
        _p_keys(params, {"gscale"})
        _p_scale(params)
        _parts_keys(parts, {"x"})
        if not np.isfinite(_part(parts, "x", np.float16, n)).all():
            raise CodecError("fp16 payload holds non-finite values")

    def decode(self, n, params, parts):
        y = parts["x"].astype(F32)
        y *= F32(params["gscale"])
        return y


class AbsmaxCodec(Codec):
    name = "absmax"

    def encode(self, x, cfg: QuantConfig, rng):
        if cfg.stochastic and rng is None:
            raise ValueError("stochastic rounding needs an explicit rng (np.random.Generator)")
        g = _gscale(x)
        xb = _blocks(x, cfg.block)
        if cfg.levels == "sqrt":
            s16, codes = _quantize_sqrt(xb, cfg.bits, g)
        else:
            s16 = _block_scales(xb, cfg.bits, g)
            codes = _quantize(xb, s16, cfg.bits, g, rng if cfg.stochastic else None)
        params = {"bits": cfg.bits, "block": cfg.block, "gscale": g, "stochastic": bool(cfg.stochastic),
                  "levels": cfg.levels}
        return params, {"q": pack_bits(codes.reshape(-1), cfg.bits), "s": s16}

    def validate(self, n, params, parts):
        _p_keys(params, {"bits", "block", "gscale", "stochastic", "levels"})
        bits, block = _p_int(params, "bits", QUANT_BITS), _p_int(params, "block", BLOCK_SIZES)
        _p_scale(params)
        if type(params["stochastic"]) is not bool or params["levels"] not in LEVELS:
            raise CodecError(f"param 'stochastic' must be a bool and 'levels' one of {LEVELS}")
        _parts_keys(parts, {"q", "s"})
        nb = -(-n // block)
        _part(parts, "q", np.uint8, nb * block * bits // 8)
        if not np.isfinite(_part(parts, "s", np.float16, nb)).all():
            raise CodecError("absmax scales hold non-finite values")

    def decode(self, n, params, parts):
        bits, block, g = params["bits"], params["block"], params["gscale"]
        s16 = parts["s"]
        codes = unpack_bits(parts["q"], bits, s16.size * block).reshape(s16.size, block)
        if params["levels"] == "sqrt":
            return _dequantize_sqrt(codes, s16, bits, g).reshape(-1)[:n]
        return _dequantize(codes, s16, bits, g).reshape(-1)[:n]


class TopKCodec(Codec):
    name = "topk"

    def encode(self, x, cfg: TopKConfig, rng):
        n = x.size
        if n >= 1 << 32:
            raise ValueError("topk supports arrays below 2**32 elements")
        k = cfg.k_for(n)
        if k == 0:
            idx = np.zeros(0, np.int64)
        elif k == n:
            idx = np.arange(n)
        else:
            idx = np.sort(np.argpartition(np.abs(x), n - k)[n - k :])
        vals = x[idx]
        params: dict[str, Any] = {"values": cfg.values}
        if cfg.values == "fp16":
            g = _gscale(vals)
            params["gscale"] = g
            v = (vals * F32(1.0 / g)).astype(np.float16)
        else:
            v = vals.astype(F32)
        return params, {"i": idx.astype(np.uint32), "x": v}

    def validate(self, n, params, parts):
        kind = params.get("values")
        if kind not in ("fp32", "fp16"):
            raise CodecError(f"param 'values' = {kind!r} must be 'fp32' or 'fp16'")
        _p_keys(params, {"values", "gscale"} if kind == "fp16" else {"values"})
        if kind == "fp16":
            _p_scale(params)
        _parts_keys(parts, {"i", "x"})
        i = parts["i"]
        k = i.size
        if k > n:
            raise CodecError(f"topk carries {k} values for {n} elements")
        _part(parts, "i", np.uint32, k)
        x = _part(parts, "x", F32 if kind == "fp32" else np.float16, k)
        if k and (int(i[-1]) >= n or (k > 1 and not (np.diff(i.astype(np.int64)) > 0).all())):
            raise CodecError("topk indices must be strictly increasing and < n")
        if not np.isfinite(x).all():
            raise CodecError("topk values hold non-finite values")

    def decode(self, n, params, parts):
        out = np.zeros(n, F32)
        v = parts["x"].astype(F32)
        if params["values"] == "fp16":
            v *= F32(params["gscale"])
        out[parts["i"].astype(np.int64)] = v
        return out


def _chunk_bytes(blocks_per_chunk: np.ndarray, block: int, bits: int) -> np.ndarray:
    """Payload bytes of each chunk at ``bits`` (scales included: one fp16 per block for every width)."""
    return blocks_per_chunk * (2 + block * bits // 8)


def _hull_allocation(err: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """Option index per chunk minimising Σ err within Σ cost ≤ budget (greedy on lower convex hulls).

    err, cost: (n_chunks, n_options), options sorted by increasing cost. Starts every chunk at option 0 and
    takes hull segments by decreasing error-reduction per byte while they fit (skipping ones that don't).
    """
    nc, no = err.shape
    choice = [0] * nc
    spent = int(cost[:, 0].sum())
    if spent > budget:
        raise ValueError(f"budget {budget} B is below the smallest encoding ({spent} B)")
    E, K = err.tolist(), cost.tolist()  # plain lists: this loop is scalar work, numpy indexing is slow here
    segs: list[tuple[float, int, int, int, int]] = []  # (-slope, chunk, order, from, to)
    for c in range(nc):
        e, k = E[c], K[c]
        hull = [0]
        for o in range(1, no):
            if e[o] >= e[hull[-1]]:
                continue  # costs more, no better: never on the hull
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (e[b] - e[o]) / (k[o] - k[b]) >= (e[a] - e[b]) / (k[b] - k[a]):
                    hull.pop()  # b lies above the segment a→o
                else:
                    break
            hull.append(o)
        for j in range(1, len(hull)):
            a, b = hull[j - 1], hull[j]
            segs.append((-(e[a] - e[b]) / max(1, k[b] - k[a]), c, j, a, b))
    segs.sort()
    for _, c, _, a, b in segs:
        if choice[c] != a:
            continue  # an earlier segment of this chunk was skipped: later ones would break the hull order
        extra = K[c][b] - K[c][a]
        if spent + extra <= budget:
            choice[c] = b
            spent += extra
    return np.asarray(choice, np.int64)


class AdaptiveCodec(Codec):
    """Chunks of ``chunk`` values, each at its own width. Payload: ``b`` (uint8 bits per chunk), ``s`` (fp16
    scale per block, all blocks), ``q``: for each width ascending, the packed codes of the chunks using it, in
    chunk order (fp16 bytes of ``x / gscale`` for width 16, raw float32 bytes of ``x`` for width 32)."""

    name = "adaptive"

    def encode(self, x, cfg: AdaptiveConfig, rng):
        if cfg.stochastic and rng is None:
            raise ValueError("stochastic rounding needs an explicit rng (np.random.Generator)")
        rng = rng if cfg.stochastic else None
        block, chunk = cfg.block, cfg.chunk
        g = _gscale(x)
        xb = _blocks(x, block)  # (nb, block)
        nb = xb.shape[0]
        bpc = chunk // block
        nc = -(-nb // bpc)
        chunk_of_block = np.arange(nb) // bpc
        blocks_per_chunk = np.bincount(chunk_of_block, minlength=nc)
        blk_norm2 = np.einsum("ij,ij->i", xb, xb, dtype=np.float64)
        norm2 = np.bincount(chunk_of_block, weights=blk_norm2, minlength=nc)
        m = xb[np.arange(nb), np.abs(xb).argmax(axis=1)] if nb else np.zeros(0, F32)  # signed absmax per block
        scratch = (np.empty_like(xb), np.empty_like(xb))

        def trial(bits: int, sel: np.ndarray | None, want_codes: bool = True
                  ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
            """(codes or raw values, scales, per-chunk squared error) for the blocks ``sel`` (None: all).

            The error is computed in scaled units, (q − y)²·d², which skips a dequantize pass per width."""
            xs = xb if sel is None else xb[sel]
            cb = chunk_of_block if sel is None else chunk_of_block[sel]
            if bits == 32:  # raw float32: exact (values are taken from xb when packing)
                return None, np.zeros(xs.shape[0], np.float16), np.zeros(nc)
            if bits == 16:
                vals = (xs * F32(1.0 / g)).astype(np.float16)
                r = vals.astype(F32) * F32(g) - xs
                e_blk = np.einsum("ij,ij->i", r, r).astype(np.float64)
                return vals, np.zeros(xs.shape[0], np.float16), np.bincount(cb, weights=e_blk, minlength=nc)
            half = 1 << (bits - 1)
            ms = m if sel is None else m[sel]
            s16 = (ms * F32(-1.0 / (g * half))).astype(np.float16)
            d = s16.astype(F32) * F32(g)
            with np.errstate(divide="ignore"):
                inv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
            # Full-size trials reuse two scratch buffers: fresh multi-MB arrays cost page faults each time.
            full = sel is None
            y = np.multiply(xs, inv[:, None], out=scratch[0] if full else None)
            if rng is None:
                q = np.rint(y, out=scratch[1] if full else None)
            else:
                q = np.add(y, rng.random(y.shape, dtype=F32), out=scratch[1] if full else None)
                np.floor(q, out=q)
            np.clip(q, -half, half - 1, out=q)
            y -= q
            # float32 sums of 64 squares are accurate to ~1e-6 relative: plenty for choosing widths
            e_blk = np.einsum("ij,ij->i", y, y).astype(np.float64) * (d.astype(np.float64) ** 2)
            zero = d == 0  # a block whose scale underflowed decodes to 0: its error is its energy
            if zero.any():
                e_blk[zero] = (blk_norm2 if sel is None else blk_norm2[sel])[zero]
            e = np.bincount(cb, weights=e_blk, minlength=nc)
            if not want_codes:
                return None, s16, e
            q += F32(half)
            return q.astype(np.uint8), s16, e

        opts = cfg.bits
        choice = np.full(nc, len(opts) - 1, np.int64)  # index into opts, per chunk
        codes = np.zeros((nb, block), np.uint8)  # codes of the chosen quantized width, per block
        scales = np.zeros(nb, np.float16)
        have = np.zeros(nc, bool)  # codes/scales stored for the chunk's current choice

        def keep(sel_chunks: np.ndarray, blk_sel: np.ndarray | None, vals: np.ndarray, s16: np.ndarray) -> None:
            blk = sel_chunks[chunk_of_block]
            take = blk if blk_sel is None else sel_chunks[chunk_of_block[blk_sel]]
            codes[blk] = vals[take]
            scales[blk] = s16[take]
            have[sel_chunks] = True

        if cfg.mode == "A":
            # Binary search per chunk over the widths (error falls as bits grow): ~log2(len(bits)) passes
            # instead of one per width. A hair under target², so float32 rounding in the decoder cannot tip
            # a chunk over the target.
            tol2 = float(cfg.target) ** 2 * (1.0 - 1e-4)
            lo = np.zeros(nc, np.int64)
            hi = choice  # the last width is accepted unconditionally (32: exact)
            while (active := lo < hi).any():
                mid = (lo + hi) // 2
                for j in np.unique(mid[active]).tolist():
                    cm = active & (mid == j)
                    blk_sel = cm[chunk_of_block]
                    vals, s16, e = trial(opts[j], blk_sel)
                    ok = cm & (e <= tol2 * norm2)
                    hi[ok] = j
                    lo[cm & ~ok] = j + 1
                    if opts[j] < 16:
                        keep(ok, blk_sel, vals, s16)
                    have[ok] = True
        else:
            quant = [b for b in opts if b < 16]
            # Measured exactly: every width ≤ 4 bits (clipping-to-zero regime, no model fits) and the widest
            # quantized one; widths in between are interpolated log-linearly (error ∝ 4^-bits there), fp16
            # is modelled. Halves the cost of mode B; measure_all=True measures every width.
            exact = set(quant) if cfg.measure_all else {b for b in quant if b <= 4} | set(quant[-1:])
            measured = {b: trial(b, None, want_codes=False)[2] for b in sorted(exact)}
            errs, costs = [], []
            for bits in opts:
                if bits in measured:
                    e = measured[bits]
                elif bits < 16:
                    lo_b = max(b for b in measured if b < bits)
                    hi_b = min(b for b in measured if b > bits)
                    t = (bits - lo_b) / (hi_b - lo_b)
                    e = np.exp((1 - t) * np.log(measured[lo_b] + 1e-300) + t * np.log(measured[hi_b] + 1e-300))
                elif bits == 16:  # fp16 of x/g: relative noise 2^-11, absolute below the normal range
                    small = np.bincount(chunk_of_block, weights=(np.abs(xb) < F32(g * 2.0**-14)).sum(axis=1),
                                        minlength=nc)
                    e = norm2 * (2.0**-22 / 3.0) + small * (g * 2.0**-24) ** 2 / 12.0
                else:  # raw float32: exact
                    e = np.zeros(nc)
                errs.append(e)
                costs.append(_chunk_bytes(blocks_per_chunk, block, bits) + 1)  # +1: the chunk's bits byte
            if nc:
                choice = _hull_allocation(np.stack(errs, 1), np.stack(costs, 1), int(cfg.budget or 0))
        chunk_bits = np.asarray(opts, np.uint8)[choice]
        for j, bits in enumerate(opts):  # codes for chunks whose chosen width was not kept from a trial
            need = (choice == j) & ~have
            if bits < 16 and need.any():
                blk_sel = need[chunk_of_block]
                vals, s16, _ = trial(bits, blk_sel)
                keep(need, blk_sel, vals, s16)
        q = []
        for bits in sorted(set(chunk_bits.tolist())):
            blk = (chunk_bits == bits)[chunk_of_block]
            if bits == 32:
                q.append(np.ascontiguousarray(xb[blk]).astype("<f4").view(np.uint8).reshape(-1))
            elif bits == 16:
                q.append((xb[blk] * F32(1.0 / g)).astype("<f2").view(np.uint8).reshape(-1))
            else:
                q.append(pack_bits(codes[blk].reshape(-1), bits))
        params = {"block": block, "chunk": chunk, "gscale": g, "stochastic": bool(cfg.stochastic)}
        params["mode"] = cfg.mode
        qcat = np.concatenate(q) if q else np.zeros(0, np.uint8)
        return params, {"b": chunk_bits, "s": scales, "q": qcat}

    @staticmethod
    def _layout(n: int, params: Mapping[str, Any]) -> tuple[int, int, np.ndarray]:
        block, chunk = params["block"], params["chunk"]
        nb = -(-n // block)
        bpc = chunk // block
        nc = -(-nb // bpc)
        blocks_per_chunk = np.full(nc, bpc, np.int64)
        if nc:
            blocks_per_chunk[-1] = nb - bpc * (nc - 1)
        return nb, nc, blocks_per_chunk

    def validate(self, n, params, parts):
        _p_keys(params, {"block", "chunk", "gscale", "stochastic", "mode"})
        block = _p_int(params, "block", BLOCK_SIZES)
        chunk = _p_int(params, "chunk")
        if not 0 < chunk <= MAX_CHUNK or chunk % block:
            raise CodecError(f"param 'chunk' = {chunk} must be a positive multiple of block <= {MAX_CHUNK}")
        _p_scale(params)
        if type(params["stochastic"]) is not bool or params["mode"] not in ("A", "B"):
            raise CodecError("params 'stochastic' must be a bool and 'mode' 'A' or 'B'")
        _parts_keys(parts, {"b", "s", "q"})
        nb, nc, bpc = self._layout(n, params)
        b = _part(parts, "b", np.uint8, nc)
        if not np.isin(b, ADAPTIVE_BITS).all():
            raise CodecError(f"chunk widths must be in {ADAPTIVE_BITS}")
        if not np.isfinite(_part(parts, "s", np.float16, nb)).all():
            raise CodecError("adaptive scales hold non-finite values")
        need = int((bpc * block * b.astype(np.int64)).sum()) // 8
        q = _part(parts, "q", np.uint8, need)
        off = 0
        for bits in (16, 32):  # raw chunks must be finite too
            m = b == bits
            if not m.any():
                continue
            off = int((bpc[b < bits] * block * b[b < bits].astype(np.int64)).sum()) // 8
            nbytes = int(bpc[m].sum()) * block * bits // 8
            raw = q[off : off + nbytes].view("<f2" if bits == 16 else "<f4")
            if not np.isfinite(raw).all():
                raise CodecError(f"adaptive {bits}-bit chunks hold non-finite values")

    def decode(self, n, params, parts):
        block, g = params["block"], params["gscale"]
        nb, nc, bpc = self._layout(n, params)
        b = parts["b"]
        chunk_of_block = np.repeat(np.arange(nc), bpc)
        out = np.empty((nb, block), F32)
        q, s = parts["q"], parts["s"]
        off = 0
        for bits in ADAPTIVE_BITS:
            blk = (b == bits)[chunk_of_block]
            cnt = int(blk.sum())
            if not cnt:
                continue
            nbytes = cnt * block * bits // 8
            seg = q[off : off + nbytes]
            off += nbytes
            if bits == 16:
                out[blk] = seg.view("<f2").astype(F32).reshape(cnt, block) * F32(g)
            elif bits == 32:
                out[blk] = seg.view("<f4").reshape(cnt, block)
            else:
                codes = unpack_bits(seg, bits, cnt * block).reshape(cnt, block)
                out[blk] = _dequantize(codes, s[blk], bits, g)
        return out.reshape(-1)[:n]


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Add a codec to the registry under ``codec.name`` (both sides must register it)."""
    if not codec.name or codec.name in CODECS:
        raise ValueError(f"codec name {codec.name!r} is empty or already registered")
    CODECS[codec.name] = codec
    return codec


for _c in (RawCodec(), Fp16Codec(), AbsmaxCodec(), TopKCodec(), AdaptiveCodec()):
    register_codec(_c)


def as_config(codec: str | CodecConfig) -> CodecConfig:
    """A config from a shortcut name (``"q4"``, ``"fp16"``...) or a config passed through."""
    if isinstance(codec, str):
        if codec not in SHORTCUTS:
            raise ValueError(f"unknown codec shortcut {codec!r}; known: {sorted(SHORTCUTS)} or pass a config")
        return SHORTCUTS[codec]()
    return codec


def encode(x: np.ndarray, codec: str | CodecConfig = "q8", *, rng: np.random.Generator | None = None) -> EncodedArray:
    """Compress a float array (any shape) with ``codec`` (shortcut name or config).

    ``rng`` is required for stochastic rounding (pass a seeded ``np.random.Generator``: reproducible).
    Raises ValueError on non-finite input or a non-float dtype.
    """
    a = np.asarray(x)
    if a.dtype.name not in DTYPES:
        raise ValueError(f"codecs take float16/32/64 arrays, got {a.dtype}")
    cfg = as_config(codec)
    flat = np.ascontiguousarray(a, dtype=F32).reshape(-1)
    _check_finite(flat)
    params, parts = CODECS[cfg.codec].encode(flat, cfg, rng)
    return EncodedArray(codec=cfg.codec, shape=tuple(int(n) for n in a.shape), dtype=a.dtype.name, params=params,
                        parts=parts)


def decode(enc: EncodedArray) -> np.ndarray:
    """The decoded array of ``enc`` (same as ``enc.decode()``)."""
    return enc.decode()


def chunk_errors(x: np.ndarray, enc: EncodedArray, chunk: int = 4096) -> np.ndarray:
    """Relative L2 error of ``enc`` against ``x`` on each chunk of ``chunk`` values (0 where x is all zero)."""
    a = np.asarray(x, F32).reshape(-1)
    r = enc.decode().astype(F32).reshape(-1) - a
    idx = np.arange(a.size) // chunk
    e = np.bincount(idx, weights=r.astype(np.float64) ** 2)
    nrm = np.bincount(idx, weights=a.astype(np.float64) ** 2)
    return np.sqrt(np.divide(e, nrm, out=np.zeros_like(e), where=nrm > 0))


class ErrorFeedback:
    """Sender-side error feedback: compress ``x + residual``, keep what the compression lost for next time.

    Typical with top-k for dense θ deltas: the dropped mass is not lost, only delayed (EF-SGD).
    """

    def __init__(self, codec: str | CodecConfig = TopKConfig(ratio=0.01)) -> None:
        self.config = as_config(codec)
        self.residual: np.ndarray | None = None

    def encode(self, x: np.ndarray, *, rng: np.random.Generator | None = None) -> EncodedArray:
        """Compress ``x`` plus the carried residual; updates the residual."""
        a = np.asarray(x, F32)
        if self.residual is not None and self.residual.shape != a.shape:
            raise ValueError(f"ErrorFeedback got shape {a.shape}, residual has {self.residual.shape}")
        v = a + self.residual if self.residual is not None else a.copy()
        enc = encode(v, self.config, rng=rng)
        self.residual = v - enc.decode().astype(F32)
        return enc

    def reset(self) -> None:
        """Forget the residual (e.g. after a dense resync)."""
        self.residual = None
