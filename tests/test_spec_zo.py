"""The shared contract: adapter layout (protocol.spec) and the ZO update math (protocol.zo)."""

from __future__ import annotations

import numpy as np
import pytest

from protocol import (
    AdapterSpec,
    Group,
    Guide,
    ModelDims,
    Schedule,
    StepRecord,
    apply_step,
    direction,
    online_lambda,
    orthonormal_basis,
    replay,
    to_gradient_units,
    zo_gradient,
)

DIMS = ModelDims(n_layers=3, hidden=64, intermediate=128, n_heads=4, n_kv_heads=2)


def test_flatten_order_is_layer_then_target_then_a_before_b() -> None:
    # Prepare
    spec = AdapterSpec("lora", DIMS, rank=4, targets=("v_proj", "q_proj"), layers=(2, 0))
    # Execute
    names = [t.gguf_name for t in spec.tensors]
    # Assert
    assert names[:4] == [
        "blk.0.attn_v.weight.lora_a",
        "blk.0.attn_v.weight.lora_b",
        "blk.0.attn_q.weight.lora_a",
        "blk.0.attn_q.weight.lora_b",
    ]
    assert names[4].startswith("blk.2.")
    offsets = [t.offset for t in spec.tensors]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert spec.d == sum(t.size for t in spec.tensors)
    # v_proj under GQA: out = n_kv_heads * head_dim = 32
    assert spec.tensors[1].shape == (32, 4)


def test_flatten_unflatten_roundtrip_and_views() -> None:
    spec = AdapterSpec("lora", DIMS, rank=2, targets=("q_proj", "down_proj"))
    tensors = spec.init(seed=7)
    rng = np.random.default_rng(0)
    for name in tensors:
        tensors[name] = rng.standard_normal(tensors[name].shape).astype(np.float32)

    theta = spec.flatten(tensors)
    back = spec.unflatten(theta)
    theta[0] = 123.0  # unflatten returns views: a write to θ shows in the tensor

    assert all(np.shares_memory(back[n], theta) for n in back)
    assert back[spec.tensors[0].gguf_name].reshape(-1)[0] == 123.0
    np.testing.assert_array_equal(back[spec.tensors[-1].gguf_name], tensors[spec.tensors[-1].gguf_name])


def test_init_is_a_noop_adapter_and_deterministic() -> None:
    spec = AdapterSpec("lora", DIMS, rank=4)
    a, b = spec.init(3), spec.init(3)
    for info in spec.tensors:
        np.testing.assert_array_equal(a[info.gguf_name], b[info.gguf_name])
        if info.part == "B":
            assert not a[info.gguf_name].any()
        else:  # PEFT's Kaiming-uniform bound for a=sqrt(5): 1/sqrt(fan_in)
            assert np.abs(a[info.gguf_name]).max() <= 1 / np.sqrt(info.shape[1])
    assert not np.array_equal(spec.flatten(spec.init(4)), spec.flatten(a))


def test_train_b_only_halves_the_space_and_needs_frozen_a() -> None:
    full = AdapterSpec("lora", DIMS, rank=4, targets=("q_proj",))
    fa = AdapterSpec("lora", DIMS, rank=4, targets=("q_proj",), train="B")
    init = fa.init(0)
    theta = fa.flatten(init)

    assert fa.d == full.d // 2  # q_proj here is square: A and B have the same size
    with pytest.raises(KeyError, match="frozen"):
        fa.unflatten(theta)
    out = fa.unflatten(theta, frozen=init)
    np.testing.assert_array_equal(out["blk.0.attn_q.weight.lora_a"], init["blk.0.attn_q.weight.lora_a"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "prefix"}, "kind"),
        ({"kind": "lora", "targets": ("qkv",)}, "unknown LoRA target"),
        ({"kind": "lora", "layers": (5,)}, "out of range"),
        ({"kind": "lora", "train": "A"}, "train"),
        ({"kind": "lora", "rank": 0}, "rank"),
    ],
)
def test_spec_rejects_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdapterSpec(dims=DIMS, **kwargs)


def test_spec_dict_roundtrip_and_control_kind() -> None:
    spec = AdapterSpec("control", DIMS, layers=(1, 2))
    again = AdapterSpec.from_dict(spec.to_dict())
    assert again == spec and again.d == 2 * DIMS.hidden
    assert [t.gguf_name for t in spec.tensors] == ["direction.1", "direction.2"]
    with pytest.raises(ValueError, match="malformed"):
        AdapterSpec.from_dict({"kind": "lora"})


def test_direction_is_deterministic_and_seed_dependent() -> None:
    z1, z2, z3 = direction(5, 1000), direction(5, 1000), direction(6, 1000)
    np.testing.assert_array_equal(z1, z2)
    assert z1.dtype == np.float32 and not np.array_equal(z1, z3)


def test_guided_covariance_matches_design() -> None:
    # E[z zᵀ] = α·I + (1−α)(d/k)·QQᵀ, checked through its action on Q and on a vector ⟂ Q.
    d, k, alpha, n = 400, 2, 0.5, 6000
    rng = np.random.default_rng(1)
    q = orthonormal_basis([rng.standard_normal(d) for _ in range(k)])
    guide = Guide(q, alpha)
    z = np.stack([direction(s, d, guide) for s in range(n)])  # (n, d)
    perp = rng.standard_normal(d)
    perp -= q @ (q.T @ perp)
    perp /= np.linalg.norm(perp)

    along = np.mean((z @ q) ** 2, axis=0)  # qᵀCq for each column
    across = np.mean((z @ perp) ** 2)

    expected_along = alpha + (1 - alpha) * d / k
    np.testing.assert_allclose(along, expected_along, rtol=0.08)
    assert abs(across - alpha) < 0.05
    assert abs(np.mean(np.sum(z * z, axis=1)) / d - 1.0) < 0.02  # E‖z‖² = d, like MeZO


def test_gradient_units_make_the_subspace_part_unbiased() -> None:
    # With exact directional derivatives g = zᵀ∇L, mean(g z)/gain → QQᵀ∇L + (α/gain)(I − QQᵀ)∇L.
    d, n = 60, 20000
    rng = np.random.default_rng(2)
    grad = rng.standard_normal(d).astype(np.float32)
    guide = Guide(orthonormal_basis([grad + rng.standard_normal(d)]), alpha=0.3)
    seeds = np.arange(n, dtype=np.uint64)
    gs = np.array([direction(int(s), d, guide) @ grad for s in seeds], np.float32)

    est = zo_gradient(StepRecord([Group(seeds, gs)]), d, guide)

    # Along Q: the gradient itself, with only k-dimensional noise.
    np.testing.assert_allclose(guide.basis.T @ est, guide.basis.T @ grad, rtol=0.05)
    # Off Q: the gradient shrunk by α/gain (plus noise shrunk alike).
    perp = grad - guide.basis @ (guide.basis.T @ grad)
    est_perp = est - guide.basis @ (guide.basis.T @ est)
    ratio = float(est_perp @ perp / (perp @ perp))
    assert abs(ratio - guide.alpha / guide.gain) < 0.5 * guide.alpha / guide.gain


def test_unguided_estimate_is_plain_mezo() -> None:
    d = 30
    seeds, gs = np.arange(4, dtype=np.uint64), np.array([0.5, -1.0, 2.0, 0.1], np.float32)
    expected = sum(g * direction(int(s), d) for s, g in zip(seeds, gs, strict=True)) / 4
    for guide in (None, Guide(orthonormal_basis([np.ones(d)]), alpha=1.0)):
        np.testing.assert_allclose(zo_gradient(StepRecord([Group(seeds, gs)]), d, guide), expected, rtol=1e-6)


def test_to_gradient_units_is_exact_on_the_subspace() -> None:
    d = 50
    rng = np.random.default_rng(3)
    guide = Guide(orthonormal_basis([rng.standard_normal(d) for _ in range(3)]), alpha=0.4)
    cov = guide.alpha * np.eye(d) + (1 - guide.alpha) * d / guide.k * guide.basis @ guide.basis.T
    v = guide.basis @ rng.standard_normal(3).astype(np.float32)  # a vector in span(Q)
    np.testing.assert_allclose(to_gradient_units(cov.astype(np.float32) @ v, guide), v, rtol=1e-4, atol=1e-5)


def test_replay_equals_stepwise_application_with_momentum_and_rectification() -> None:
    d = 300
    rng = np.random.default_rng(4)
    guide = Guide(orthonormal_basis([rng.standard_normal(d)]), 0.5, rng.standard_normal(d).astype(np.float32))
    sched = Schedule(lr=0.01, momentum=0.9, warmup=2, decay="cosine", total_steps=6)
    steps = [
        StepRecord([Group(rng.integers(0, 2**63, 3, dtype=np.uint64), rng.standard_normal(3), 0, 120),
                    Group(rng.integers(0, 2**63, 5, dtype=np.uint64), rng.standard_normal(5), 120, -1)],
                   lam=0.25 * i)
        for i in range(4)
    ]
    theta0 = rng.standard_normal(d).astype(np.float32)
    theta, vel = theta0.copy(), np.zeros(d, np.float32)
    for t, st in enumerate(steps):
        apply_step(theta, vel, st, t, sched, guide)

    np.testing.assert_array_equal(replay(theta0, steps, sched, guide), theta)
    assert not np.array_equal(theta, theta0)


def test_split_groups_touch_only_their_span() -> None:
    d = 100
    step = StepRecord([Group([1, 2], [1.0, -2.0], 0, 40)])
    u = zo_gradient(step, d, None)
    assert u[:40].any() and not u[40:].any()


def test_rectification_without_cloud_gradient_is_an_error() -> None:
    with pytest.raises(ValueError, match="cloud gradient"):
        apply_step(np.zeros(10, np.float32), None, StepRecord([Group([1], [1.0])], lam=0.5), 0, Schedule(), None)


def test_online_lambda_trusts_the_cloud_when_it_predicts_the_zo_scalars() -> None:
    g = np.array([1.0, -2.0, 0.5])
    assert online_lambda(g, g + 1e-3, d=10_000) > 0.99  # cloud gradient explains every g: trust it
    assert online_lambda(g, -10 * g, d=1) < 0.1  # cloud gradient far off, tiny d: trust the ZO estimate
    assert online_lambda(np.array([]), np.array([]), d=5) == 0.0


def test_online_lambda_is_meaningful_under_guidance_at_llm_scale() -> None:
    # d = 460,800, k = 4, α = 0.5 (DESIGN.md's example): gain 57,600. A cloud gradient that explains
    # half of each g must give a λ strictly inside (0, 1), not the ≈1 of the raw-unit formula.
    d, gain = 460_800, 0.5 + 0.5 * 460_800 / 4
    rng = np.random.default_rng(5)
    g = rng.standard_normal(16) * np.sqrt(gain)  # g is √gain-sized along the subspace
    lam = online_lambda(g, 0.5 * g, d=d, gain=gain)
    assert 0.05 < lam < 0.95
    assert online_lambda(g, 0.5 * g, d=d) > 0.999  # unscaled: the ZO term swamps everything


def test_schedule_validation_and_shapes() -> None:
    with pytest.raises(ValueError, match="momentum"):
        Schedule(momentum=1.0)
    s = Schedule(lr=1.0, warmup=4, decay="linear", total_steps=14, min_ratio=0.0)
    assert s.lr_at(0) == 0.25 and s.lr_at(3) == 1.0 and s.lr_at(14) == 0.0
    assert Schedule(eps=1e-3, eps_decay=1.0).eps_at(1) == pytest.approx(5e-4)
