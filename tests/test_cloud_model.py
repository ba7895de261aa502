"""The cloud's torch twin and full federated rounds on the tiny llama: torch guidance in the cloud,
llama.cpp ZO training on the edges (the edge's Trainer on the F32 GGUF of the same model), real data."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.config import GuideConfig
from cloud.daemon import GuideServer
from cloud.data import load_rotten_tomatoes, split
from cloud.guidance import GuidanceBuilder, GuidanceConfig, build_guide
from cloud.model import ClassificationTask, LoRAModel, TorchScorer, load_base, spec_for
from edge.client import ClientConfig, EdgeClient
from edge.round_trainer import EdgeTrainerAdapter, client_seed

TOKENS = {f"c{i}": f"secret-token-{i:04d}" for i in range(3)}


@pytest.fixture(scope="module")
def slices():
    return split(load_rotten_tomatoes(), {"public": 64, "c0": 48, "c1": 48, "c2": 48}, np.random.default_rng(0))


def _cloud(model_dir: Path, public, *, k: int = 2):
    torch.manual_seed(0)
    model, tok = load_base(model_dir, device="cpu")
    spec = spec_for(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), layers=(), train="AB")
    lora = LoRAModel(model=model, spec=spec, init_seed=0)
    scorer = TorchScorer(lora=lora, tokenizer=tok, task=ClassificationTask())
    batches = public.batches(16)
    builder = GuidanceBuilder(grad_fn=lambda th, b: scorer.gradient(th, *batches[b]),
                              config=GuidanceConfig(k=k, batches=2, mix_alpha=0.5), rng=np.random.default_rng(0),
                              n_batches=len(batches))
    return spec, lora, scorer, builder, batches


def _edge_trainer(gguf: Path, spec, data, name: str):
    from edge.data import Row
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import ClassificationTask as EdgeTask
    from edge.train import TrainConfig, Trainer

    rt = Runtime(gguf, RuntimeConfig(n_ctx=1024, n_seq_max=8, n_threads=1))
    task = EdgeTask(rt, {"rotten": "negative", "fresh": "positive"})
    rows = [Row(t, "fresh" if y else "rotten") for t, y in zip(data.texts, data.labels, strict=False)]
    cfg = TrainConfig(batch_size=8, seed=client_seed(name) % (2**31), q=2)
    return Trainer(rt, task, [task.encode(r) for r in rows], spec, cfg), rt


def _config(tmp_path: Path, **rounds) -> GuideConfig:
    return GuideConfig(tokens=TOKENS).override(
        server={"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl"),
                "long_poll_s": 2.0, "insecure": True},  # plaintext on purpose: TLS is tested in test_cloud.py
        rounds={"join_window_s": 0.3, **rounds},
        train={"kind": "guided", "local_steps": 20, "lr": 0.02, "eps": 1e-3, "lam": 0.5, "q": 2, "mix_alpha": 0.5, "k": 2})


def test_lora_is_views_of_one_theta_and_matches_peft(tiny_llama_dir):
    # Prepare: the cloud LoRA and a PEFT model loaded with the same tensors
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, tok = load_base(tiny_llama_dir, device="cpu")
    spec = spec_for(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), layers=(), train="AB")
    lora = LoRAModel(model=model, spec=spec, init_seed=3)
    theta = np.random.default_rng(1).standard_normal(spec.d).astype(np.float32) * 0.1
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                         LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    sd = {info.peft_name.replace(".weight", ".default.weight"): torch.from_numpy(t.copy())
          for info, t in zip(spec.tensors, spec.unflatten(theta).values(), strict=False)}
    missing = ref.load_state_dict(sd, strict=False)
    ids = torch.tensor([tok.encode("Review: a fine film\nSentiment (positive or negative):")])
    # Execute
    lora.set_theta(theta)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = ref(input_ids=ids).logits
    # Assert: same function; θ round-trips; the A/B tensors are views (share storage with θ)
    assert not missing.unexpected_keys
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lora.get_theta(), theta)
    wrapped = model.model.layers[1].self_attn.v_proj
    view = wrapped._view(wrapped.b_slot)
    assert view.untyped_storage().data_ptr() == lora.theta.untyped_storage().data_ptr()


def test_cloud_gradient_matches_finite_difference(tiny_llama_dir, slices):
    # Prepare
    spec, lora, scorer, builder, batches = _cloud(tiny_llama_dir, slices["public"])
    theta = lora.get_theta()
    theta[spec.tensors[1].offset : spec.tensors[1].offset + 50] = 0.05  # non-zero B so A has a gradient
    g, _ = scorer.gradient(theta, *batches[0])
    v = np.random.default_rng(0).standard_normal(spec.d).astype(np.float32)
    v /= np.linalg.norm(v)
    # Execute
    h = 1e-2
    fd = (scorer.loss_value(theta + h * v, *batches[0]) - scorer.loss_value(theta - h * v, *batches[0])) / (2 * h)
    guide = build_guide([g, 2 * g + v], alpha=0.5)
    builder.close()
    # Assert
    assert abs(fd - float(g @ v)) < 1e-3 + 1e-2 * abs(fd)
    assert guide.k == 2 and np.allclose(guide.basis.T @ guide.basis, np.eye(2), atol=1e-5)


def test_replay_is_exact_edge_llamacpp_vs_cloud(tmp_path, tiny_llama_dir, tiny_llama_gguf, slices):
    # Prepare: a guide with the tiny torch model; one edge training through llama.cpp
    spec, lora, _, builder, _ = _cloud(tiny_llama_dir, slices["public"])
    cfg = _config(tmp_path, rounds=1, min_clients=1, max_clients=1, deadline_s=60.0)
    trainer, rt = _edge_trainer(tiny_llama_gguf, spec, slices["c0"], "c0")

    async def main():
        srv = GuideServer(config=cfg, spec=spec, theta0=lora.get_theta(), guidance=builder)
        await srv.start()
        try:
            cl = EdgeClient(config=ClientConfig(host="127.0.0.1", port=srv.port, client_id="c0",
                                                token=TOKENS["c0"], state_dir=str(tmp_path / "c0"), insecure=True),
                            trainer=EdgeTrainerAdapter(trainer=trainer), rng=np.random.default_rng(0),
                            log=lambda *a, **k: None)
            await asyncio.wait_for(cl.run(), 120)
            return cl
        finally:
            await srv.stop()

    # Execute
    cl = asyncio.run(main())
    from cloud.store import Store

    st = Store(root=tmp_path / "state")
    theta0, theta1 = st.load_theta(0), st.load_theta(1)
    rt.close()
    # Assert: the θ the guide reconstructed from (seed, g) records is the θ the edge computed
    moved = np.linalg.norm(cl.theta - theta0)
    assert moved > 0
    assert np.linalg.norm(theta1 - cl.theta) / moved <= 1e-6
    assert cl.summary.rounds[0]["reply"] == "ack"


def test_three_edges_three_rounds_public_loss_falls_dead_edge_hits_deadline(tmp_path, tiny_llama_dir,
                                                                             tiny_llama_gguf, slices):
    # Prepare: guide + 3 llama.cpp edges; c2 hangs in round 1 and is killed there
    spec, lora, scorer, builder, batches = _cloud(tiny_llama_dir, slices["public"])
    theta0 = lora.get_theta()
    deadline = 5.0
    cfg = _config(tmp_path, rounds=3, min_clients=2, max_clients=3, deadline_s=deadline)
    trainers = {c: _edge_trainer(tiny_llama_gguf, spec, slices[c], c) for c in TOKENS}
    hang, started = threading.Event(), threading.Event()

    class Hangs(EdgeTrainerAdapter):
        def train_round(self, **kw):
            if kw["first_step"] > 0:  # round 1: the device freezes mid-round
                started.set()
                hang.wait(30)
            return super().train_round(**kw)

    async def main():
        srv = GuideServer(config=cfg, spec=spec, theta0=theta0, guidance=builder)
        await srv.start()
        try:
            cls = {c: EdgeClient(config=ClientConfig(host="127.0.0.1", port=srv.port, client_id=c, token=t,
                                                     state_dir=str(tmp_path / c), max_rounds=3, insecure=True),
                                 trainer=(Hangs if c == "c2" else EdgeTrainerAdapter)(trainer=trainers[c][0]),
                                 rng=np.random.default_rng(i), log=lambda *a, **k: None)
                   for i, (c, t) in enumerate(TOKENS.items())}
            tasks = {c: asyncio.ensure_future(cl.run()) for c, cl in cls.items()}
            while not started.is_set():
                await asyncio.sleep(0.05)
            tasks["c2"].cancel()  # killed mid-round
            await asyncio.wait_for(asyncio.gather(tasks["c0"], tasks["c1"]), 120)
            while not srv.finished:  # the last round closes just after the last ack
                await asyncio.sleep(0.05)
            return srv.store.rounds()
        finally:
            hang.set()
            await srv.stop()

    # Execute
    t0 = time.monotonic()
    rounds = asyncio.run(main())
    elapsed = time.monotonic() - t0
    from cloud.store import Store

    theta3 = Store(root=tmp_path / "state").load_theta(3)
    loss0 = np.mean([scorer.loss_value(theta0, *b) for b in batches])
    loss3 = np.mean([scorer.loss_value(theta3, *b) for b in batches])
    for _tr, rt in trainers.values():
        rt.close()
    # Assert
    assert [r["status"] for r in rounds] == ["closed"] * 3
    assert [r["uploads"] for r in rounds] == [3, 2, 2] and rounds[1]["selected"] == 3
    assert rounds[1]["closed_at"] - rounds[1]["opened_at"] <= deadline + 2.0  # the dead edge did not hold it
    assert loss3 < loss0 - 0.02, (loss0, loss3)
    assert elapsed < 90
