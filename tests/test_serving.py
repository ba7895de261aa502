"""What a user serves is what was trained (real SmolLM2-135M Q4_1, ``slow``).

Train a sentiment adapter briefly with ``edgezo train --val-fraction`` (the threshold is fitted on that
private split and saved as ``OUT.calib.json``), then load it the way users load adapters,
``llama_cpp.Llama(model_path=..., lora_path=...)``, greedy-complete eval's prompt for held-out reviews with
``llama_kwargs()`` / ``serving_kwargs(calib)`` and check that the answers are label words agreeing with
``edgezo eval``'s calibrated predictions. Also measured (printed, run with -s) and not asserted: how often the adapter answers a
label word WITHOUT the logit_bias, and how often that unbiased answer matches eval's raw prediction.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LABEL_WORDS = "fresh=positive,rotten=negative"
N_TRAIN, N_HELD = 80, 40


def _rt_rows() -> list[tuple[str, str]]:
    """Short Rotten Tomatoes snippets, alternating fresh/rotten (deterministic)."""
    try:
        from cloud.data import load_rotten_tomatoes
        data = load_rotten_tomatoes()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"Rotten Tomatoes data unavailable: {e}")
    by = {0: [], 1: []}
    for t, y in zip(data.texts, data.labels, strict=True):
        if 20 <= len(t) <= 100:
            by[y].append(t)
    n = (N_TRAIN + N_HELD) // 2
    rows = []
    for a, b in zip(by[1][:n], by[0][:n], strict=True):
        rows += [(a, "fresh"), (b, "rotten")]
    return rows


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def _cli(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"edgezo {args[0]} failed rc={r.returncode}\n{r.stderr[-3000:]}"
    return r


def test_served_adapter_answers_label_words_agreeing_with_eval(smollm2_gguf, tmp_path):
    import llama_cpp

    from edge.calibration import Calibration, calibration_path, llama_kwargs, serve

    rows = _rt_rows()
    train_csv = _write_csv(tmp_path / "train.csv", rows[:N_TRAIN])
    held_csv = _write_csv(tmp_path / "held.csv", rows[N_TRAIN:])
    out = tmp_path / "sent.gguf"
    common = ["--model", smollm2_gguf, "--label-words", LABEL_WORDS, "--threads", 1, "--n-ctx", 1024,
              "--batch-size", 4]

    # Train with a private validation split: the calibration is saved next to the adapter
    tr = _cli("train", *common, "--data", train_csv, "--eval-fraction", 0, "--val-fraction", 0.25,
              "--steps", 4, "--out", out, "--rank", 4, "--lr", 1e-2, "--eps", 1e-2, "--no-progress")
    summary = json.loads(tr.stdout.strip().splitlines()[-1])
    assert "calibration on 20 private validation rows" in tr.stderr
    calib = Calibration.load(calibration_path(out))
    assert summary["calibration"]["threshold"] == calib.threshold and calib.n_val == 20

    # eval with the saved calibration: raw, calibrated and oracle accuracies, per-example predictions
    preds_path = tmp_path / "preds.jsonl"
    # --batch-size 1: one prompt per llama.cpp pass, as served (llama.cpp's rounding depends on the batch's
    # composition: a batched eval's margins move by a few tenths, flipping near-threshold examples)
    ev = _cli("eval", *common, "--batch-size", 1, "--adapter", out, "--data", held_csv, "--predictions", preds_path)
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert res["calibration"] == str(calibration_path(out)) and res["n"] == N_HELD
    assert {"accuracy", "calibrated_accuracy", "oracle_calibrated_accuracy"} <= set(res)
    preds = [json.loads(line) for line in preds_path.read_text().splitlines()]
    assert len(preds) == N_HELD

    # Serve as users do: Llama(model_path, lora_path), greedy, eval's prompt, the calibrated logit_bias
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), lora_path=str(out), n_ctx=512, n_threads=1,
                          logits_all=False, verbose=False, **llama_kwargs())
    biased, plain = [], []
    for p in preds:  # the unbiased answer second: llama-cpp-python reuses the prompt's KV cache
        biased.append(serve(llm, calib, p["text"]))
        plain.append(serve(llm, calib, p["text"], use_bias=False))
    llm.close()

    agree = sum(lab == p["calibrated"] for (_, lab), p in zip(biased, preds, strict=True)) / N_HELD
    words = sum(lab is not None for _, lab in biased) / N_HELD
    plain_words = sum(lab is not None for _, lab in plain) / N_HELD
    plain_raw = sum(lab == p["raw"] for (_, lab), p in zip(plain, preds, strict=True)) / N_HELD
    report = {
        "n_held_out": N_HELD, "threshold": calib.threshold, "val_accuracy_raw": calib.val_accuracy_raw,
        "val_accuracy_calibrated": calib.val_accuracy_calibrated, "eval": {k: res[k] for k in
        ("accuracy", "calibrated_accuracy", "oracle_calibrated_accuracy")},
        "served_with_bias": {"label_word_rate": words, "agreement_with_eval_calibrated": agree},
        "served_without_bias": {"label_word_rate": plain_words, "agreement_with_eval_raw": plain_raw,
                                "answers": sorted({a for a, _ in plain})[:10]},
    }
    print("\nserving report:", json.dumps(report, indent=1))
    assert words == 1.0, f"served answers that are not label words: {[a for a, lab in biased if lab is None]}"
    assert agree >= 0.95, report
