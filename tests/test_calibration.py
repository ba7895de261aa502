"""Calibration (edge/calibration.py), no model: threshold / bias fitting, prediction, the serving logit_bias,
the JSON round trip, answer parsing, and the CLI's one-line errors for bad --val-* flags."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge.calibration import (
    Calibration,
    CalibrationError,
    calibration_path,
    fit_biases,
    metrics_with_calibration,
    serving_kwargs,
)
from edge.tasks import classification_metrics

WORDS = dict(template="Review: {text}\nSentiment (positive or negative):", label_names=["rotten", "fresh"],
             label_words=["negative", "positive"], token_ids=[4633, 3541])


def _calib(scores, y, k=None) -> Calibration:
    """Binary with the sentiment words by default; ``k`` classes with token ids 100..100+k−1."""
    if k is None:
        return Calibration.fit(scores, y, **WORDS)
    return Calibration.fit(scores, y, template="{text}:", label_names=[f"c{i}" for i in range(k)],
                           label_words=[f"w{i}" for i in range(k)], token_ids=list(range(100, 100 + k)))


def test_binary_threshold_fixes_a_biased_scorer():
    s = np.array([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]])  # always predicts class 0
    y = np.array([0, 0, 1, 1])
    c = _calib(s, y)
    assert c.val_accuracy_raw == 0.5 and c.val_accuracy_calibrated == 1.0 and c.n_val == 4
    assert c.threshold == pytest.approx(-1.25)  # midpoint of margins −1.5 and −1.0
    assert c.bias == [0.0, pytest.approx(1.25)]
    assert c.predict(s).tolist() == [0, 0, 1, 1]
    assert c.predict(np.array([[0.0, -1.2], [0.0, -1.3]])).tolist() == [1, 0]  # class 1 iff s1 − s0 > threshold


def test_binary_fit_keeps_raw_rule_when_it_is_already_best():
    s = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    c = _calib(s, np.array([0, 1, 0, 1]))
    assert c.threshold == 0.0 and c.val_accuracy_calibrated == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_binary_fit_matches_the_oracle_and_is_best(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = rng.integers(0, 2, n)
    s = np.stack([rng.normal(0, 1, n) + 1.5, rng.normal(0, 1, n) + y * 1.2], 1)  # biased towards class 0
    c = _calib(s, y)
    assert c.val_accuracy_calibrated == pytest.approx(classification_metrics(s, y)["calibrated_accuracy"])
    assert c.val_accuracy_calibrated >= c.val_accuracy_raw
    margin = s[:, 1] - s[:, 0]
    for t in np.linspace(margin.min() - 1, margin.max() + 1, 301):  # no threshold does better
        assert ((margin > t).astype(int) == y).mean() <= c.val_accuracy_calibrated + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_biases_never_lose_accuracy(seed):
    rng = np.random.default_rng(seed)
    n, k = 90, 4
    y = rng.integers(0, k, n)
    s = rng.normal(0, 1, (n, k)) + np.eye(k)[y] * 1.5 + np.array([2.0, 0.0, -1.0, 0.5])  # per-class offsets
    c = _calib(s, y, k)
    assert len(c.bias) == k and c.bias[0] == 0.0 and c.threshold is None
    assert c.val_accuracy_calibrated >= c.val_accuracy_raw + 0.05
    assert c.val_accuracy_calibrated == pytest.approx((c.predict(s) == y).mean())


@pytest.mark.parametrize("k", [2, 3, 5])
def test_logit_bias_argmax_over_label_tokens_equals_predict(k):
    """Served greedily with logit_bias (added to the logits, as llama-cpp-python does), the argmax over the
    whole vocabulary is a label token, and exactly the class predict() gives."""
    rng = np.random.default_rng(k)
    n, vocab = 400, 1000
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 3, (n, vocab)).astype(np.float32)
    calib = _calib(rng.normal(0, 2, (200, k)) + np.arange(k), rng.integers(0, k, 200), k)
    cols = calib.token_ids
    logits[:, cols] += np.eye(k)[y] * 0.5
    lb = calib.logit_bias()
    assert set(lb) == set(cols) and min(lb.values()) == pytest.approx(100.0)
    biased = logits.copy()
    for t, v in lb.items():  # llama-cpp-python's logit_bias_processor, in float32
        biased[:, t] = np.float32(v) + biased[:, t]
    greedy = biased.argmax(1)
    assert set(greedy.tolist()) <= set(cols)
    assert [cols.index(t) for t in greedy] == calib.predict(logits[:, cols]).tolist()


def test_serving_kwargs_are_greedy_single_token():
    c = _calib(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    kw = serving_kwargs(c)
    assert kw["max_tokens"] == 1 and kw["temperature"] == 0.0 and kw["repeat_penalty"] == 1.0
    assert kw["logit_bias"] == c.logit_bias()
    assert "logit_bias" not in serving_kwargs(c, use_bias=False)


def test_save_load_round_trip_and_errors(tmp_path):
    s = np.array([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]])
    c = _calib(s, np.array([0, 0, 1, 1]))
    p = calibration_path(tmp_path / "a.gguf")
    assert p.name == "a.gguf.calib.json"
    c.save(p)
    assert [f.name for f in p.parent.iterdir()] == [p.name]  # written atomically, no tmp left
    c2 = Calibration.load(p)
    assert c2 == c and c2.predict(s).tolist() == c.predict(s).tolist() and c2.logit_bias() == c.logit_bias()
    assert json.loads(p.read_text())["threshold"] == c.threshold
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CalibrationError, match="not a calibration"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "v.json").write_text(json.dumps({**c.to_dict(), "version": 99}))
    with pytest.raises(CalibrationError, match="version"):
        Calibration.load(tmp_path / "v.json")


def test_prompt_and_answer_parsing():
    c = _calib(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    assert c.serve_prompt("  Great fun. ") == "Review: Great fun.\nSentiment (positive or negative):"
    assert c.answer_to_label(" positive") == "fresh" and c.answer_to_label(" Negative.") == "rotten"
    assert c.answer_to_label(" pos") == "fresh" and c.answer_to_label("negative, clearly") == "rotten"
    assert c.answer_to_label(" 1.") is None and c.answer_to_label("") is None and c.answer_to_label(" neutral") is None


def test_metrics_label_the_oracle():
    s = np.array([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]])
    y = np.array([0, 0, 1, 1])
    m = metrics_with_calibration(s, y, None)
    assert m["oracle_calibrated_accuracy"] == 1.0 and m["calibrated_accuracy"] is None and m["accuracy"] == 0.5
    saved = _calib(np.array([[0.0, 5.0], [5.0, 0.0]]), np.array([1, 0]))  # threshold 0: the raw rule
    assert metrics_with_calibration(s, y, saved)["calibrated_accuracy"] == 0.5  # saved, not refitted


def test_fit_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fit_biases(np.zeros((3, 1)), np.zeros(3, int))
    with pytest.raises(ValueError):
        fit_biases(np.zeros((3, 2)), np.array([0, 1, 2]))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra, msg", [
    (["--val-fraction", 1.5], "--val-fraction must be between 0 and 1"),
    (["--val-fraction", 0], "--val-fraction must be between 0 and 1"),
    (["--val-fraction", 0.2, "--val-data", "v.csv"], "not both"),
])
def test_train_cli_rejects_bad_val_flags(tmp_path, extra, msg):
    r = _cli("train", "--model", tmp_path / "m.gguf", "--data", tmp_path / "d.csv", "--steps", 1,
             "--out", tmp_path / "o.gguf", *extra)
    assert r.returncode == 2 and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("edgezo: error:")


@pytest.mark.parametrize("out, msg", [
    ("missing-folder/o.gguf", "does not exist (create it first)"),
    ("a-file/o.gguf", "does not exist (create it first)"),
])
def test_train_cli_refuses_an_output_it_cannot_write_before_training(tmp_path, out, msg):
    """Checked before the model is even loaded (it does not exist here): hours of steps never end on a bad --out."""
    (tmp_path / "a-file").write_text("not a folder")
    r = _cli("train", "--model", tmp_path / "m.gguf", "--data", tmp_path / "d.csv", "--steps", 1, "--out", tmp_path / out)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("edgezo: error:")
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_eval_cli_bad_calibration_is_one_line(tmp_path):
    (tmp_path / "c.json").write_text("{nope")
    r = _cli("eval", "--model", tmp_path / "m.gguf", "--data", tmp_path / "d.csv", "--calibration", tmp_path / "c.json")
    assert r.returncode == 2 and "not a calibration JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- CLI end to end on the tiny random llama (conftest): train saves the calibration, eval uses it --------
def _reviews_csv(path):
    pos = ["A triumph.", "Funny and warm.", "Smart and moving.", "A delight.", "Superb acting.", "Loved it.",
           "Brilliant fun.", "A gem of a film."]
    neg = ["Tedious.", "A lazy sequel.", "Dull and long.", "A mess.", "Joyless.", "Awful script.", "Boring.",
           "A waste of time."]
    path.write_text("text,label\n" + "".join(f"{t},fresh\n" for t in pos) + "".join(f"{t},rotten\n" for t in neg))
    return path


def test_train_saves_calibration_and_eval_uses_it(tiny_llama_gguf, tmp_path):
    data = _reviews_csv(tmp_path / "r.csv")
    out = tmp_path / "a.gguf"
    common = ["--model", tiny_llama_gguf, "--label-words", "fresh=positive,rotten=negative", "--threads", 1,
              "--n-ctx", 256, "--batch-size", 4]
    tr = _cli("train", *common, "--data", data, "--steps", 2, "--out", out, "--rank", 2, "--eval-fraction", 0.25,
              "--val-fraction", 0.34, "--no-progress")
    assert tr.returncode == 0, tr.stderr
    assert "calibration on 4 private validation rows" in tr.stderr
    summary = json.loads(tr.stdout.strip().splitlines()[-1])
    calib = Calibration.load(calibration_path(out))
    assert summary["calibration"]["threshold"] == calib.threshold and calib.n_val == 4
    assert {"accuracy", "calibrated_accuracy", "oracle_calibrated_accuracy"} <= set(summary["eval"])

    preds = tmp_path / "p.jsonl"
    ev = _cli("eval", *common, "--data", data, "--adapter", out, "--predictions", preds)
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert res["calibration"] == str(calibration_path(out)) and res["n"] == 16
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    scores = np.array([r["scores"] for r in rows])
    cal = [calib.labels[k] for k in calib.predict(scores)]
    assert [r["calibrated"] for r in rows] == cal  # eval applies the SAVED threshold
    y = np.array([calib.labels.index(r["label"]) for r in rows])
    assert res["calibrated_accuracy"] == pytest.approx((calib.predict(scores) == y).mean())

    ev = _cli("eval", *common, "--data", data, "--adapter", out, "--no-calibration")
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert res["calibration"] is None and res["calibrated_accuracy"] is None

    tr = _cli("train", *common, "--data", data, "--steps", 1, "--out", tmp_path / "b.gguf", "--rank", 2,
              "--no-progress")
    assert tr.returncode == 0 and "no calibration saved" in tr.stderr
    assert not calibration_path(tmp_path / "b.gguf").exists()

    ev = _cli("eval", *common, "--data", data, "--adapter", out, "--template", "Text: {text}\nLabel:")
    assert ev.returncode == 2 and "fitted with template" in ev.stderr
