"""SmolLM2-135M (Q4_1) end to end: it runs quantized in a subprocess, in-place writes equal a reloaded adapter,
and one ZO step on real reviews replays exactly on the cloud side."""

from __future__ import annotations

import numpy as np
import pytest

from edge.adapter import LoraAdapter
from edge.data import Row
from edge.runtime import Runtime, RuntimeConfig
from edge.tasks import ClassificationTask
from edge.train import TrainConfig, Trainer
from protocol.spec import AdapterSpec
from protocol.zo import replay

pytestmark = pytest.mark.slow

REVIEWS = [Row("A triumph of style and feeling.", "fresh"), Row("Tedious, shapeless and far too long.", "rotten"),
           Row("Funny, warm and smart.", "fresh"), Row("A lazy, joyless sequel.", "rotten")]


def test_smollm2_quantized_runs_in_subprocess(smollm2_gguf):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edge.runtime", str(smollm2_gguf)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, f"rc={r.returncode}\n{r.stderr[-2000:]}"


def test_smollm2_inplace_and_step(smollm2_gguf):
    rt = Runtime(smollm2_gguf, RuntimeConfig(n_ctx=512, n_seq_max=4))
    task = ClassificationTask(rt, {"fresh": "positive", "rotten": "negative"})
    batch = [task.encode(r) for r in REVIEWS]
    spec = AdapterSpec("lora", rt.dims(), rank=4, alpha=8.0, targets=("q_proj", "v_proj"), layers=(0, 10, 29))
    tr = Trainer(rt, task, batch, spec, TrainConfig(steps=1, batch_size=4, lr=1e-3, eps=1e-2))
    theta0 = tr.theta.copy()
    rec, info = tr.train_step()
    assert np.isfinite(info.loss) and not info.rejected
    assert np.array_equal(replay(theta0, [rec], tr.schedule, None), tr.theta)
    # in place vs reloaded, with a visibly non-zero adapter
    theta = tr.theta + (0.05 * np.random.default_rng(0).standard_normal(spec.d)).astype(np.float32)
    tr.adapter.write(theta)
    live = task.scores(batch)
    ref = LoraAdapter(rt, spec, spec.unflatten(theta))
    np.testing.assert_allclose(task.scores(batch), live, atol=1e-5, rtol=0)
    ref.close()
    tr.close()
    rt.close()
