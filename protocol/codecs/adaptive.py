"""The adaptive codec: per chunk of values one bit width from ``bits``. Mode A meets a relative error target per
chunk (binary search); mode B spends a byte budget where it lowers the total error most (lower convex hulls)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protocol.codecs.basic import Codec, _p_int, _p_keys, _p_scale, _part, _parts_keys
from protocol.codecs.config import ADAPTIVE_BITS, BLOCK_SIZES, MAX_CHUNK, AdaptiveConfig
from protocol.codecs.quant import _blocks, _dequantize, _gscale, pack_bits, unpack_bits
from protocol.errors import CodecError

F32 = np.float32


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

