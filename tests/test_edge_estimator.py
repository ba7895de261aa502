"""The ZO estimator is right: its mean matches torch backprop's adapter gradient on the same weights, batch
and adapter; guided directions have the stated covariance; edge and cloud see the same z (exact replay)."""

from __future__ import annotations

import numpy as np
import pytest

from edge.data import Row
from edge.runtime import Runtime, RuntimeConfig
from edge.tasks import ClassificationTask
from edge.train import TrainConfig, Trainer
from edge.zo import ZOConfig, zo_measure
from protocol.spec import LORA_TARGETS, AdapterSpec
from protocol.zo import Guide, Schedule, StepRecord, direction, orthonormal_basis, replay, zo_gradient

ROWS = [
    Row("a wonderful, moving film", "pos"),
    Row("dull and far too long", "neg"),
    Row("the cast is great but the plot is thin", "pos"),
    Row("I hated every minute", "neg"),
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_gguf):
    rt = Runtime(tiny_llama_gguf, RuntimeConfig(n_ctx=256, n_seq_max=8, n_threads=1, exact=True))
    task = ClassificationTask(rt, {"pos": "positive", "neg": "negative"})
    yield rt, task
    rt.close()


def nonzero_adapter(spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    """spec.init(seed) with B ~ N(0, 0.3²) too, so A also gets gradient."""
    t = spec.init(seed)
    rng = np.random.Generator(np.random.PCG64(seed + 100))
    for info in spec.tensors:
        if info.part == "B":
            t[info.gguf_name] = (0.3 * rng.standard_normal(info.shape)).astype(np.float32)
    return t


def torch_grad(model_dir, spec: AdapterSpec, tensors, batch, cols) -> tuple[float, np.ndarray]:
    """Loss and exact ∂loss/∂θ (PEFT order) by backprop through a hand-written LoRA on the HF model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    params = {k: torch.tensor(v, requires_grad=True) for k, v in tensors.items()}
    layers = model.model.layers
    for bid in spec.layers:
        for t in spec.targets:
            mod = layers[bid].get_submodule(LORA_TARGETS[t][0])
            a = params[f"blk.{bid}.{LORA_TARGETS[t][1]}.weight.lora_a"]
            b = params[f"blk.{bid}.{LORA_TARGETS[t][1]}.weight.lora_b"]

            def hook(m, inp, out, a=a, b=b):
                return out + spec.scale * (inp[0] @ a.T) @ b.T

            mod.register_forward_hook(hook)
    total = 0.0
    for e in batch:
        ids = torch.tensor([list(e.tokens)])
        logits = model(input_ids=ids).logits[0, e.want[0], cols]  # (K,)
        total = total + torch.nn.functional.cross_entropy(logits[None], torch.tensor([e.targets[0]]))
    loss = total / len(batch)
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in params.items()}
    return float(loss.detach()), spec.flatten(grads)


def test_zo_mean_matches_backprop(tiny, tiny_llama_dir):
    rt, task = tiny
    spec = AdapterSpec("lora", rt.dims(), rank=1, alpha=2.0, targets=("q_proj", "v_proj"), layers=(1,))  # d = 224
    tensors = nonzero_adapter(spec, 0)
    batch = [task.encode(r) for r in ROWS]
    cfg = TrainConfig(steps=1, batch_size=len(ROWS), seed=0, lr=0.0, eps=1e-3)
    tr = Trainer(rt, task, batch, spec, cfg, tensors=tensors)
    theta = tr.theta.copy()
    loss_torch, grad = torch_grad(tiny_llama_dir, spec, tensors, batch, task.cols)
    assert abs(tr.loss_at(theta, batch) - loss_torch) < 1e-4  # same function on both sides

    n = 2000
    seeds = np.arange(1, n + 1, dtype=np.uint64)
    rec, info = zo_measure(lambda th: tr.loss_at(th, batch), theta, 1e-3, seeds, ZOConfig(q=n))
    assert not info.rejected
    est = zo_gradient(rec, spec.d, None)  # mean_i g_i z_i
    cos = float(est @ grad / (np.linalg.norm(est) * np.linalg.norm(grad)))
    print(f"cosine(mean of {n} ZO estimates, backprop gradient) = {cos:.4f}, d = {spec.d}")
    assert cos >= 0.9
    # each g_i is the directional derivative: compare with <∇L, z_i> directly (a much tighter check)
    dots = np.array([grad @ direction(int(s), spec.d) for s in seeds[:50]])
    np.testing.assert_allclose(rec.groups[0].grads[:50], dots, rtol=0.05, atol=2e-3)
    tr.close()


def test_guided_covariance():
    d, k, alpha, n = 12, 2, 0.3, 40000
    rng = np.random.default_rng(0)
    q = orthonormal_basis([rng.standard_normal(d) for _ in range(k)])
    g = Guide(q, alpha)
    z = np.stack([direction(s, d, g) for s in range(n)]).astype(np.float64)  # (n, d)
    cov = z.T @ z / n
    want = alpha * np.eye(d) + (1 - alpha) * d / k * (q.astype(np.float64) @ q.T.astype(np.float64))
    assert np.abs(cov - want).max() < 0.15 * np.abs(want).max()
    assert abs(np.mean((z * z).sum(1)) - d) < 0.05 * d  # E‖z‖² = d, like MeZO


def test_edge_steps_replay_exactly(tiny):
    """Edge applies its own records with apply_step; the cloud's replay from the seeds reproduces θ bit for bit.
    Covers plain, guided (+ rectification) and split-perturbation steps."""
    rt, task = tiny
    spec = AdapterSpec("lora", rt.dims(), rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    batch = [task.encode(r) for r in ROWS]
    rng = np.random.default_rng(1)
    basis = orthonormal_basis([rng.standard_normal(spec.d) for _ in range(3)])
    guide = Guide(basis, 0.5, (1e-3 * rng.standard_normal(spec.d)).astype(np.float32))
    for split, g, lam in [(None, None, 0.0), (None, guide, 0.3), (1, guide, "online"), (1, None, 0.0)]:
        cfg = TrainConfig(steps=3, batch_size=2, seed=5, lr=1e-3, eps=1e-2, momentum=0.9, q=2, split_layer=split, lam=lam,
                          p2=2)
        tr = Trainer(rt, task, batch, spec, cfg, tensors=nonzero_adapter(spec, 3))
        theta0 = tr.theta.copy()
        records: list[StepRecord] = []
        for _ in range(3):
            rec, info = tr.train_step(g)
            assert not info.rejected
            records.append(rec)
        if split is not None:
            assert [len(grp.seeds) for grp in records[0].groups] == [1, 2]
        if lam == "online":
            assert 0.0 < records[0].lam < 1.0
        cloud = replay(theta0, records, Schedule(lr=1e-3, eps=1e-2, momentum=0.9, total_steps=3), g)
        assert np.array_equal(cloud, tr.theta)
        assert not np.array_equal(theta0, tr.theta)
        tr.close()


def test_nan_loss_rejects_step():
    theta = np.zeros(10, np.float32)
    rec, info = zo_measure(lambda th: float("nan"), theta, 1e-3, np.array([1, 2], np.uint64), ZOConfig(q=2))
    assert info.rejected and "non-finite" in info.reason
    assert rec.groups == [] and rec.lam == 0.0
