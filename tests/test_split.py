"""FedSPZO activation reuse (edge/split.py): capture after layer s-1, run the tail GGUF from the captured states.

Parity of tail logits with the full forward (tiny F32 models here; SmolLM2 Q4_0 in the slow test), the split step
with reuse replayed bit for bit, frozen-bottom mode, and the guide's split settings changing what the edge runs
(passes counted by the runtimes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.data import Row
from edge.runtime import Runtime, RuntimeConfig
from edge.split import SplitRunner, tail_model
from edge.tasks import ClassificationTask, GenerationTask
from edge.train import TrainConfig, Trainer
from protocol.spec import AdapterSpec
from protocol.zo import Schedule, apply_step

TEXTS = ["a wonderful, moving film", "dull and far too long", "I laughed the whole way through",
         "the plot makes no sense at all", "quietly brilliant acting", "a waste of two hours"]
WORDS = {"0": "negative", "1": "positive"}


def _rows(n: int = 12) -> list[Row]:
    return [Row(TEXTS[i % len(TEXTS)] + f" #{i}", str(i % 2)) for i in range(n)]


def _trainer(gguf: Path, tmp_path: Path, *, layers=(), split_layer=None, reuse=True, q=1, p1=1, p2=2,
             n_ctx: int = 1024) -> Trainer:
    rt = Runtime(gguf, RuntimeConfig(n_ctx=n_ctx, n_seq_max=16, n_threads=2, exact=True))
    task = ClassificationTask(rt, WORDS)
    spec = AdapterSpec("lora", rt.dims(), rank=4, targets=("q_proj", "v_proj", "down_proj"), layers=layers)
    cfg = TrainConfig(steps=4, batch_size=4, seed=3, lr=1e-2, eps=1e-2, q=q, split_layer=split_layer,
                      p1=p1, p2=p2, init_b_std=0.05, reuse=reuse)
    return Trainer(rt, task, [task.encode(r) for r in _rows()], spec, cfg)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("model", ["tiny_llama_gguf", "tiny_qwen2_gguf"])
def test_tail_logits_equal_the_full_forward_on_f32(model, request, tmp_path):
    """Captured state + tail vs the full forward, same θ (a non-zero adapter on both blocks): max |Δ| ≤ 1e-4."""
    gguf = request.getfixturevalue(model)
    tr = _trainer(gguf, tmp_path, split_layer=1)
    batch = tr.batch(0)
    theta = tr.theta + np.float32(0.05) * np.random.default_rng(0).standard_normal(tr.theta.size).astype(np.float32)
    tr.adapter.write(theta)
    seqs, want = [e.tokens for e in batch], [e.want for e in batch]
    full = tr.rt.logits(seqs, want)  # (n, V) every vocabulary logit
    states = tr.splitter.capture(batch)
    assert [h.shape for h in states] == [(len(s), tr.rt.n_embd) for s in seqs]
    tr.splitter.write_tail(theta[tr.splitter.split :])
    tail = tr.splitter.tail_logits(batch, states, None)
    assert tail.shape == full.shape
    assert np.abs(tail - full).max() <= 1e-4
    # the generation task's loss from tail logits (every completion position) matches too
    gen = GenerationTask(tr.rt)
    gb = [gen.encode(Row("The film was", " good fun")), gen.encode(Row("Rain again", " today"))]
    full_loss = gen.loss(gb)
    tail_loss = gen.loss_from(tr.splitter.tail_logits(gb, tr.splitter.capture(gb), None), gb)
    assert abs(full_loss - tail_loss) <= 1e-5
    tr.close()
    tr.rt.close()


def test_tail_model_is_cached_and_follows_the_base(tiny_llama_gguf, tmp_path):
    """Made once per base-model content; a changed base gets a new tail, an out-of-range split a clear error."""
    folder = tmp_path / "tails"
    a = tail_model(tiny_llama_gguf, 1, folder)
    mtime = a.stat().st_mtime_ns
    assert tail_model(tiny_llama_gguf, 1, folder) == a and a.stat().st_mtime_ns == mtime
    changed = tmp_path / "changed.gguf"
    data = bytearray(tiny_llama_gguf.read_bytes())
    data[-1] ^= 0xFF  # one weight byte differs
    changed.write_bytes(bytes(data))
    b = tail_model(changed, 1, folder)
    assert b != a and b.is_file()
    with pytest.raises(Exception, match="start layer must be in 1..1"):
        tail_model(tiny_llama_gguf, 2, folder)


def test_split_step_with_reuse_matches_full_passes_and_replays_bit_for_bit(tiny_llama_gguf, tmp_path):
    """The split step measured with reuse and with full forwards gives the same g (float tolerance), and the
    cloud's replay (protocol.zo.apply_step on the records) reaches the edge's θ bit for bit."""
    reuse = _trainer(tiny_llama_gguf, tmp_path, split_layer=1, reuse=True)
    plain = _trainer(tiny_llama_gguf, tmp_path, split_layer=1, reuse=False)
    assert reuse.mode == "split" and plain.mode == "full"
    theta0 = reuse.theta.copy()
    recs_r = [reuse.train_step()[0] for _ in range(3)]
    recs_p = [plain.train_step()[0] for _ in range(3)]
    for a, b in zip(recs_r, recs_p, strict=True):
        assert [g.start for g in a.groups] == [0, reuse.zo_cfg.split]
        for ga, gb in zip(a.groups, b.groups, strict=True):
            np.testing.assert_array_equal(ga.seeds, gb.seeds)
            np.testing.assert_allclose(ga.grads, gb.grads, rtol=1e-3, atol=1e-3)
    theta = theta0.copy()
    sched = reuse.schedule
    for t, rec in enumerate(recs_r):
        apply_step(theta, None, rec, t, sched, None)
    assert np.array_equal(theta, reuse.theta)
    # reuse ran 2·p1 captures and 2·p1·(1+p2) tail passes per step, no full forward
    assert reuse.passes == {"forward": 0, "capture": 3 * 2, "tail": 3 * 2 * (1 + 2)}
    assert plain.passes["forward"] == 3 * 2 * (1 + 2) and plain.passes["tail"] == 0
    for tr in (reuse, plain):
        tr.close()
        tr.rt.close()


def test_frozen_bottom_captures_each_example_once(tiny_llama_gguf, tmp_path):
    """Every adapter layer >= s: the plain schedule on the tail, layers < s captured once per example."""
    tr = _trainer(tiny_llama_gguf, tmp_path, layers=(1,), split_layer=1, q=2)
    assert tr.mode == "frozen" and tr.zo_cfg.split is None
    full = _trainer(tiny_llama_gguf, tmp_path, layers=(1,), split_layer=None, q=2)
    for _ in range(6):
        r1, i1 = tr.train_step()
        r2, i2 = full.train_step()
        np.testing.assert_allclose(r1.groups[0].grads, r2.groups[0].grads, rtol=1e-3, atol=1e-3)
    assert tr.passes["forward"] == 0 and tr.passes["tail"] == 6 * 2 * 2
    assert tr.passes["capture"] <= 3  # 12 examples in batches of 4: each captured once, never again
    assert len(tr._states) == 12
    assert full.passes["forward"] == 6 * 2 * 2
    for t in (tr, full):
        t.close()
        t.rt.close()


def test_split_refusals_are_clear(tiny_llama_gguf, tmp_path):
    with pytest.raises(ValueError, match="split layer must be in 1..1"):
        _trainer(tiny_llama_gguf, tmp_path, split_layer=2)
    with pytest.raises(ValueError, match="above every adapter layer"):
        _trainer(tiny_llama_gguf, tmp_path, layers=(0,), split_layer=1)
    rt = Runtime(tiny_llama_gguf, RuntimeConfig(n_ctx=256, n_seq_max=4, n_threads=1))
    from edge.adapter import make_adapter

    spec = AdapterSpec("control", rt.dims(), layers=(1,))
    ad = make_adapter(rt, spec, spec.init(0))
    with pytest.raises(ValueError, match="LoRA adapters only"):
        SplitRunner(rt, ad, 1, spec.init(0))
    ad.close()
    rt.close()


def test_guide_split_settings_change_what_the_edge_runs(tiny_llama_gguf, tmp_path):
    """A round's Hyper (split_layer, p1, p2, q, batch) reaches a llama.cpp edge through EdgeTrainerAdapter and
    changes the passes the runtimes count; the guide refuses a split a subspace round cannot use."""
    from cloud.config import GuideConfig
    from cloud.daemon import check_split
    from edge.round_trainer import EdgeTrainerAdapter

    tr = _trainer(tiny_llama_gguf, tmp_path)
    ad = EdgeTrainerAdapter(trainer=tr)
    sched = Schedule(lr=1e-2, eps=1e-2)
    theta = tr.theta.copy()
    plain = ad.train_round(theta=theta, guide=None, schedule=sched, lam=0.0, local_steps=2, first_step=0,
                           hyper={"q": 1, "batch": 4, "seed_base": 0, "split_layer": -1, "p1": 0, "p2": 0})
    assert plain.forward_passes == 2 * 2 and tr.passes == {"forward": 4, "capture": 0, "tail": 0}
    split = ad.train_round(theta=theta, guide=None, schedule=sched, lam=0.0, local_steps=2, first_step=0,
                           hyper={"q": 1, "batch": 2, "seed_base": 77, "split_layer": 1, "p1": 1, "p2": 3})
    # 2 steps × (2 captures + 2·(1 + 3) tail passes), and no full forward
    assert split.forward_passes == 2 * (2 + 8)
    assert tr.passes == {"forward": 4, "capture": 4, "tail": 16}
    assert [len(g.seeds) for g in split.steps[0].groups] == [1, 3]
    assert split.examples == 2 * 2  # the round's batch size, not the trainer's
    tr.close()
    tr.rt.close()
    spec = AdapterSpec("lora", tr.spec.dims, rank=4, layers=(0, 1))
    guided = GuideConfig.from_dict({"train": {"kind": "guided", "split_layer": 1, "p2": 3}})
    check_split(guided.train, spec)  # a guided split is fine
    sub = GuideConfig.from_dict({"train": {"split_layer": 1}})
    with pytest.raises(ValueError, match="kind 'subspace' cannot use"):
        check_split(sub.train, spec)
    check_split(sub.train, AdapterSpec("lora", tr.spec.dims, rank=4, layers=(1,)))  # frozen bottom is fine
    with pytest.raises(ValueError, match="split_layer must be -1"):
        GuideConfig.from_dict({"train": {"split_layer": 0}})


@pytest.mark.slow
def test_tail_parity_on_smollm2_q4_0(smollm2_q4_0, tmp_path):
    """SmolLM2 Q4_0, split at L/2, a non-zero adapter: KL(full ‖ tail) over the vocabulary ≤ 1e-3."""
    rt = Runtime(smollm2_q4_0, RuntimeConfig(n_ctx=1024, n_seq_max=16, n_threads=2))
    task = ClassificationTask(rt, WORDS)
    spec = AdapterSpec("lora", rt.dims(), rank=8)
    tensors = spec.init(0)
    rng = np.random.default_rng(1)
    for info in spec.tensors:
        if info.part == "B":
            tensors[info.gguf_name] = (0.02 * rng.standard_normal(info.shape)).astype(np.float32)
    from edge.adapter import make_adapter

    ad = make_adapter(rt, spec, tensors)
    sp = SplitRunner(rt, ad, rt.n_layer // 2, tensors)
    batch = [task.encode(r) for r in _rows(8)]
    full = rt.logits([e.tokens for e in batch], [e.want for e in batch]).astype(np.float64)
    tail = sp.tail_logits(batch, sp.capture(batch), None).astype(np.float64)

    def log_softmax(x):
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))

    lp, lq = log_softmax(full), log_softmax(tail)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    assert kl.max() <= 1e-3, kl
    sp.close()
    ad.close()
    rt.close()


def test_cli_split_layer_runs_frozen_bottom_and_refuses_bad_layers(tiny_llama_gguf, tmp_path):
    """``edgezo train --split-layer`` reaches the trainer: frozen bottom says so; an impossible split is one line, exit 2."""
    import json
    import subprocess
    import sys

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": str(i % 2)}) + "\n" for i, t in enumerate(TEXTS * 2)))

    def cli(*extra):
        args = ["train", "--model", tiny_llama_gguf, "--data", data, "--label-words", "0=negative,1=positive",
                "--steps", 2, "--out", tmp_path / "a.gguf", "--batch-size", 4, "--rank", 2, "--threads", 1,
                "--n-ctx", 256, "--no-progress", *extra]
        return subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True,
                              timeout=240, env={**__import__("os").environ, "EDGEZO_CACHE": str(tmp_path / "c")})

    ok = cli("--layers", "1", "--split-layer", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "frozen bottom" in ok.stderr and (tmp_path / "a.gguf").is_file()
    split = cli("--split-layer", "1", "--p1", "1", "--p2", "2")
    assert split.returncode == 0 and "FedSPZO split at layer 1" in split.stderr
    bad = cli("--split-layer", "5")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "edgezo: error: split layer must be in 1..1, got 5"


def test_bench_forward_prints_a_table_and_writes_json(tiny_llama_gguf, tmp_path):
    """``edgezo bench forward`` converts the model once per type (cached), times each in a child, writes JSON."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "fwd.json"
    env = {**os.environ, "EDGEZO_CACHE": str(tmp_path / "c")}
    args = ["bench", "forward", "--model", tiny_llama_gguf, "--quants", "q8_0,q4_0", "--rounds", "1", "--reps", "2",
            "--batch", "4", "--threads", "1", "--json", out]
    r = subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "÷ q8_0" in r.stdout and "fastest here:" in r.stdout
    res = json.loads(out.read_text())
    assert res["baseline"] == "q8_0" and set(res["types"]) == {"q8_0", "q4_0"}
    assert res["types"]["q8_0"]["ratio_to_baseline"] == 1.0 and len(res["types"]["q4_0"]["forward_s"]) == 2
    assert sorted(p.name for p in (tmp_path / "c").glob("*.gguf")) == ["tiny-llama-f32.Q4_0.gguf",
                                                                       "tiny-llama-f32.Q8_0.gguf"]
    bad = subprocess.run([sys.executable, "-m", "app", "bench", "forward", "--quants", "q9"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "unknown types ['q9']" in bad.stderr


def test_bench_step_times_the_step_against_two_forwards(tiny_llama_gguf, tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "-m", "app", "bench", "step", "--model", str(tiny_llama_gguf), "--batch", "4",
                        "--steps", "2", "--split-layer", "1", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "EDGEZO_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["median_s"]) == {"zo_step", "split_reuse", "split_no_reuse", "forward"}
    assert res["zo_step_over_2_forward"] > 0 and "step ÷ 2 forwards" in r.stdout
