"""Guidance building: raw and Adam-preconditioned public gradients (no model; pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.guidance import AdamPreconditioner, GuidanceBuilder, GuidanceConfig


def test_adam_preconditioner_keeps_norm_and_equalises_coordinates() -> None:
    # Prepare: a gradient dominated by a few coordinates (like a LoRA gradient at B = 0)
    rng = np.random.default_rng(0)
    g = rng.standard_normal(1000).astype(np.float32)
    g[:5] *= 1000.0
    pre = AdamPreconditioner(beta2=0.999)

    # Execute: the first step of Adam is sign(g) (v̂ = g²), rescaled to ‖g‖
    p = pre(g)

    # Assert: same norm, same signs, equal magnitudes: the few big coordinates no longer dominate
    assert np.linalg.norm(p) == pytest.approx(np.linalg.norm(g), rel=1e-5)
    assert np.array_equal(np.sign(p), np.sign(g))
    assert np.abs(p).max() / np.abs(p).min() == pytest.approx(1.0, rel=1e-4)
    # a second gradient is divided by the running second moment, so a coordinate that was large stays damped
    g2 = np.ones(1000, np.float32)
    p2 = pre(g2)
    assert np.abs(p2[:5]).max() < 0.1 * np.abs(p2[5:]).min()


def test_builder_preconditions_history_and_refuses_unknown_mode() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(64).astype(np.float32) * np.linspace(0.01, 10, 64, dtype=np.float32)
             for _ in range(3)]
    calls = iter(grads)

    def grad_fn(theta: np.ndarray, b: int) -> tuple[np.ndarray, float]:
        return next(calls), 0.5

    b = GuidanceBuilder(grad_fn=grad_fn, config=GuidanceConfig(k=2, batches=1, precondition="adam"),
                        rng=np.random.default_rng(0), n_batches=1)

    # Execute
    g0 = b.build(np.zeros(64, np.float32), 0).guide
    b.build(np.zeros(64, np.float32), 1)
    g2 = b.build(np.zeros(64, np.float32), 2).guide
    b.close()

    # Assert: the first guidance is sign(g)·‖g‖/√d; the basis stays orthonormal with k columns
    assert np.allclose(g0.grad, np.sign(grads[0]) * np.linalg.norm(grads[0]) / 8.0, rtol=1e-4)
    assert g2.basis.shape == (64, 2)
    assert np.allclose(g2.basis.T @ g2.basis, np.eye(2), atol=1e-5)
    with pytest.raises(ValueError, match="precondition"):
        GuidanceConfig(precondition="lbfgs")
