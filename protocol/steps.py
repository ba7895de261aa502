"""StepRecord lists on the wire, compactly: one seeds array, one grads array and run-length-style group
tables (≈ 12 B per perturbation); the one encoding the Update message and the guide's SQLite store share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from protocol.constants import (
    DEFAULT_LIMITS,
    STEPS_COUNT,
    STEPS_GRADS,
    STEPS_KEYS,
    STEPS_LAMS,
    STEPS_N_GROUPS,
    STEPS_SEEDS,
    STEPS_SIZES,
    STEPS_SPAN_IDX,
    STEPS_SPANS,
    Limits,
)
from protocol.errors import (
    SchemaError,
)
from protocol.schema import I64, FloatT, IntT, WireType, _Ctx, _tname
from protocol.zo import Group, StepRecord


# ---- StepRecord lists, compactly ------------------------------------------------------------------
def _compact_ints(vals: Sequence[int]) -> int | np.ndarray:
    """An int when every value is the same (or there are none), else the smallest unsigned array."""
    if not vals or all(v == vals[0] for v in vals):
        return int(vals[0]) if vals else 0
    m = max(vals)
    dt = np.uint8 if m < 1 << 8 else np.uint16 if m < 1 << 16 else np.uint32 if m < 1 << 32 else np.uint64
    return np.asarray(vals, dtype=dt)


def _expand_ints(o: Any, n: int, hi: int, path: str) -> np.ndarray:
    """Inverse of :func:`_compact_ints` for ``n`` values (int64), each in [0, hi] (so sums cannot overflow)."""
    if type(o) is int:
        if not 0 <= o <= hi:
            raise SchemaError(f"{path}: {o} out of range [0, {hi}]")
        return np.full(n, o, np.int64)
    if not isinstance(o, np.ndarray) or o.ndim != 1 or o.dtype.kind != "u":
        raise SchemaError(f"{path}: expected an int or a 1-d unsigned int array, got {_tname(o)}")
    if o.size != n:
        raise SchemaError(f"{path}: expected {n} values, got {o.size}")
    if o.size and int(o.max()) > hi:
        raise SchemaError(f"{path}: value {int(o.max())} out of range [0, {hi}]")
    return o.astype(np.int64)


def step_records_to_wire(steps: Sequence[StepRecord]) -> dict[str, Any]:
    """The compact wire form of a StepRecord list: all seeds in one uint64 array, all grads in one float32
    array, per-step group counts / per-group sizes and span indices as one int each when uniform (else a
    small uint array), the distinct spans once, λ as one float when uniform. ≈ 12 bytes per perturbation."""
    groups = [g for s in steps for g in s.groups]
    spans: dict[tuple[int, int], int] = {}
    span_idx = [spans.setdefault((int(g.start), int(g.stop)), len(spans)) for g in groups]
    lams = [float(s.lam) for s in steps]
    seeds = np.concatenate([g.seeds for g in groups]) if groups else np.zeros(0, np.uint64)
    grads = np.concatenate([g.grads for g in groups]) if groups else np.zeros(0, np.float32)
    return {
        STEPS_COUNT: len(steps),
        STEPS_SEEDS: seeds.astype(np.uint64, copy=False),
        STEPS_GRADS: grads.astype(np.float32, copy=False),
        STEPS_N_GROUPS: _compact_ints([len(s.groups) for s in steps]),
        STEPS_SIZES: _compact_ints([int(g.seeds.size) for g in groups]),
        STEPS_SPAN_IDX: _compact_ints(span_idx),
        STEPS_SPANS: [list(sp) for sp in spans],
        STEPS_LAMS: lams[0] if lams and all(v == lams[0] for v in lams) else np.asarray(lams, np.float64)
        if lams else 0.0,
    }


def step_records_from_wire(o: Any, limits: Limits = DEFAULT_LIMITS, d: int | None = None,
                           _ctx: _Ctx | None = None, path: str = "steps") -> list[StepRecord]:
    """Validate and rebuild the StepRecord list of :func:`step_records_to_wire`; spans checked against ``d``."""
    ctx = _ctx or _Ctx(limits, 1 << 30)
    if type(o) is not dict:
        raise SchemaError(f"{path}: expected map, got {_tname(o)}")
    if set(o) != set(STEPS_KEYS):
        raise SchemaError(f"{path}: keys {sorted(map(str, o))} != {sorted(STEPS_KEYS)}")
    n_steps = IntT(0, limits.max_list).load(o[STEPS_COUNT], ctx, f"{path}.{STEPS_COUNT}")
    seeds, grads = o[STEPS_SEEDS], o[STEPS_GRADS]
    if not (isinstance(seeds, np.ndarray) and seeds.dtype == np.uint64 and seeds.ndim == 1):
        raise SchemaError(f"{path}.{STEPS_SEEDS}: expected a 1-d uint64 array")
    if not (isinstance(grads, np.ndarray) and grads.dtype == np.float32 and grads.shape == seeds.shape):
        raise SchemaError(f"{path}.{STEPS_GRADS}: expected a float32 array matching seeds ({seeds.size})")
    if not np.isfinite(grads).all():
        raise SchemaError(f"{path}.{STEPS_GRADS}: non-finite projected gradients are refused")
    ctx.add_records(n_steps, path)
    n_groups = _expand_ints(o[STEPS_N_GROUPS], n_steps, limits.max_list, f"{path}.{STEPS_N_GROUPS}")
    total_groups = int(n_groups.sum())
    ctx.add_records(total_groups, path)
    sizes = _expand_ints(o[STEPS_SIZES], total_groups, seeds.size, f"{path}.{STEPS_SIZES}")
    if int(sizes.sum()) != seeds.size:
        raise SchemaError(f"{path}: group sizes sum to {int(sizes.sum())}, {seeds.size} seeds sent")
    spans_o = o[STEPS_SPANS]
    if type(spans_o) is not list or len(spans_o) > max(1, total_groups):
        raise SchemaError(f"{path}.{STEPS_SPANS}: expected a list of at most one span per group")
    spans = []
    for i, sp in enumerate(spans_o):
        if type(sp) is not list or len(sp) != 2 or type(sp[0]) is not int or type(sp[1]) is not int:
            raise SchemaError(f"{path}.{STEPS_SPANS}[{i}]: expected [start, stop]")
        start, stop = sp
        hi = d if d is not None else I64
        if not (0 <= start <= hi and (stop == -1 or start < stop <= hi)):
            raise SchemaError(f"{path}.{STEPS_SPANS}[{i}]: span {sp} invalid (0 <= start < stop <= d, or stop -1)")
        spans.append((start, stop))
    span_idx = _expand_ints(o[STEPS_SPAN_IDX], total_groups, max(0, len(spans) - 1), f"{path}.{STEPS_SPAN_IDX}")
    if total_groups and (not spans or int(span_idx.max()) >= len(spans)):
        raise SchemaError(f"{path}.{STEPS_SPAN_IDX}: index out of range of {len(spans)} spans")
    lams_o = o[STEPS_LAMS]
    if isinstance(lams_o, np.ndarray):
        if lams_o.dtype != np.float64 or lams_o.shape != (n_steps,):
            raise SchemaError(f"{path}.{STEPS_LAMS}: expected float64 array of {n_steps}")
        if not (np.isfinite(lams_o).all() and ((lams_o >= 0) & (lams_o <= 1)).all()):
            raise SchemaError(f"{path}.{STEPS_LAMS}: λ must be finite and in [0, 1]")
        lams = lams_o.tolist()
    else:
        lams = [FloatT(0.0, 1.0).load(lams_o, ctx, f"{path}.{STEPS_LAMS}")] * n_steps
    # One copy of each array (the decoded buffers may be read-only views of the frame), then views of it per
    # group: a guide decodes 1,000s of these at once, and a copy per group cost more than the rest of the checks.
    seeds, grads = seeds.copy(), grads.copy()
    offs = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    n_groups_l, span_idx_l = n_groups.tolist(), span_idx.tolist()
    out: list[StepRecord] = []
    gi = 0
    for s in range(n_steps):
        grps = []
        for _ in range(n_groups_l[s]):
            a, b = offs[gi], offs[gi + 1]
            start, stop = spans[span_idx_l[gi]]
            grps.append(Group.checked(seeds[a:b], grads[a:b], start, stop))
            gi += 1
        out.append(StepRecord(groups=grps, lam=lams[s]))
    return out


class StepsT(WireType):
    def dump(self, v):
        return step_records_to_wire(v)

    def load(self, o, ctx, path):
        return step_records_from_wire(o, ctx.limits, None, ctx, path)


# ================================================================================================
# nested payload dataclasses
# ================================================================================================
