"""The fixed codecs: raw float32, fp16, block-wise absmax at 2-8 bits, and top-k; each a Codec with encode and
decode, strict about the parts and params it reads back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from protocol.codecs.config import BLOCK_SIZES, LEVELS, QUANT_BITS, QuantConfig, TopKConfig
from protocol.codecs.quant import (
    _block_scales,
    _blocks,
    _dequantize,
    _dequantize_sqrt,
    _gscale,
    _quantize,
    _quantize_sqrt,
    pack_bits,
    unpack_bits,
)
from protocol.errors import CodecError

F32 = np.float32


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
