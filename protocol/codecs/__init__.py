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

import numpy as np

from protocol.codecs.adaptive import AdaptiveCodec
from protocol.codecs.basic import AbsmaxCodec, Codec, Fp16Codec, RawCodec, TopKCodec
from protocol.codecs.config import CODECS, DTYPES, SHORTCUTS, CodecConfig, EncodedArray, TopKConfig
from protocol.codecs.quant import _check_finite

F32 = np.float32
DEFAULT_FEEDBACK = TopKConfig(ratio=0.01)  # ErrorFeedback's default codec: top 1%, fp32 values


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

    def __init__(self, codec: str | CodecConfig = DEFAULT_FEEDBACK) -> None:
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


# The codecs package: configs (config.py), numeric kernels (quant.py), fixed codecs (basic.py) and the adaptive one
# (adaptive.py); everything a caller needs is importable from protocol.codecs, as before the split.
from protocol.codecs.adaptive import AdaptiveCodec, _hull_allocation  # noqa: E402, F401
from protocol.codecs.basic import AbsmaxCodec, Fp16Codec, RawCodec, TopKCodec  # noqa: E402, F401
from protocol.codecs.config import (  # noqa: E402, F401
    ADAPTIVE_BITS,
    BLOCK_SIZES,
    LEVELS,
    MAX_CHUNK,
    QUANT_BITS,
    AdaptiveConfig,
    Fp16Config,
    QuantConfig,
    RawConfig,
    TopKConfig,
)
from protocol.codecs.quant import pack_bits, unpack_bits  # noqa: E402, F401
