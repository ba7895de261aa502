"""Codec configurations (one frozen dataclass per codec, validated on construction), the bit widths and
block sizes they allow, and EncodedArray: what an encoded array is on the wire."""

from __future__ import annotations

import math
from collections.abc import Callable
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

QUANT_BITS = (2, 3, 4, 5, 6, 8)
ADAPTIVE_BITS = (2, 3, 4, 5, 6, 8, 16, 32)
BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
LEVELS = ("uniform", "sqrt")
DTYPES = ("float16", "float32", "float64")
MAX_CHUNK = 1 << 24


# ================================================================================================
# EncodedArray
# ================================================================================================
# name → codec object (protocol.codecs.basic / .adaptive register theirs on import); EncodedArray decodes through it.
CODECS: dict[str, Any] = {}


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
