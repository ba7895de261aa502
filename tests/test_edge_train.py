"""Data loading, metrics, the CLI, and exact resume after SIGKILL (tiny F32 model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edge.data import DataError, Row, batch_indices, load_rows, shuffle_split
from edge.tasks import classification_metrics

POS = ["a wonderful film", "great acting and a clever plot", "moving and funny", "a joy to watch", "superb"]
NEG = ["dull and far too long", "I hated it", "a boring mess", "the worst film of the year", "tedious"]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    f = d / "reviews.jsonl"
    lines = [json.dumps({"text": t, "label": "fresh"}) for t in POS] + [json.dumps({"text": t, "label": "rotten"}) for t in NEG]
    lines += ["{not json", json.dumps({"text": "", "label": "fresh"}), json.dumps({"text": "no label"}),
              json.dumps({"text": "a plot summary", "label": "plot"}), "[1, 2]"]
    f.write_text("\n".join(lines) + "\n")
    return f


def test_load_rows_skips_and_counts(reviews, tmp_path):
    ds = load_rows(reviews, labels={"fresh", "rotten"})
    assert len(ds.rows) == 10 and ds.skipped == 5
    assert ds.reasons["unparsable"] == 2 and ds.reasons["label not in label map"] == 1
    c = tmp_path / "x.csv"
    c.write_text('text,label\n"good, really",fresh\n,rotten\n')
    ds = load_rows(c, labels={"fresh", "rotten"})
    assert ds.rows == [Row("good, really", "fresh")] and ds.skipped == 1
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(e)
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "nope.csv")
    txt = tmp_path / "x.txt"
    txt.write_text("a")
    with pytest.raises(DataError, match="unknown data format"):
        load_rows(txt)


def test_split_and_batches_deterministic():
    rows = [Row(str(i), "a") for i in range(50)]
    assert shuffle_split(rows, 3, 0.2) == shuffle_split(rows, 3, 0.2)
    tr, ev = shuffle_split(rows, 3, 0.2)
    assert len(ev) == 10 and not set(r.text for r in tr) & set(r.text for r in ev)
    b = [batch_indices(50, 16, t, 7) for t in range(10)]
    assert all(np.array_equal(x, batch_indices(50, 16, t, 7)) for t, x in enumerate(b))
    assert sorted(np.concatenate(b[:3])[:48].tolist()) == sorted(set(np.concatenate(b[:3])[:48].tolist()))  # epoch 0 no repeats


def test_calibrated_accuracy():
    s = np.array([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]])  # always predicts class 0
    y = np.array([0, 0, 1, 1])
    m = classification_metrics(s, y)
    assert m["accuracy"] == 0.5 and m["calibrated_accuracy"] == 1.0 and m["n"] == 4


def _cli(*args, check=True, timeout=240):
    r = subprocess.run([sys.executable, "-m", "app", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"edgezo {args} failed rc={r.returncode}\n{r.stderr[-3000:]}")
    return r


def _train_args(model, data, out, steps):
    return ["train", "--model", model, "--data", data, "--label-words", "fresh=positive,rotten=negative",
            "--steps", steps, "--out", out, "--batch-size", 4, "--rank", 2, "--lr", 1e-2, "--eps", 1e-2, "--q", 2,
            "--momentum", 0.9, "--threads", 1, "--n-ctx", 256, "--eval-fraction", 0.2, "--ckpt-every", 5,
            "--no-progress"]


def test_resume_after_sigkill_is_bit_identical(tiny_llama_gguf, reviews, tmp_path):
    steps = 150
    full = tmp_path / "full.gguf"
    _cli(*_train_args(tiny_llama_gguf, reviews, full, steps))
    part = tmp_path / "part.gguf"
    ckpt = tmp_path / "part.gguf.ckpt.npz"
    proc = subprocess.Popen([sys.executable, "-m", "app", *map(str, _train_args(tiny_llama_gguf, reviews, part, steps))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    with np.load(ckpt) as z:
        killed_at = json.loads(bytes(z["meta"]).decode())["step"]
    assert 0 < killed_at < steps and not part.exists()
    r = _cli(*_train_args(tiny_llama_gguf, reviews, part, steps), "--resume")
    assert f"resumed from {ckpt} at step" in r.stderr
    assert part.read_bytes() == full.read_bytes()  # bit-identical adapter GGUF

    ev = _cli("eval", "--model", tiny_llama_gguf, "--adapter", part, "--data", reviews,
              "--label-words", "fresh=positive,rotten=negative", "--threads", 1, "--n-ctx", 256)
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert {"accuracy", "calibrated_accuracy", "loss", "n"} <= set(res) and res["n"] == 10
    assert "skipped 5 rows" in ev.stderr


def test_cli_errors_are_clear(tiny_llama_gguf, reviews, tmp_path):
    r = _cli("eval", "--model", tmp_path / "missing.gguf", "--data", reviews, check=False)
    assert r.returncode == 2 and "model file not found" in r.stderr
    r = _cli("eval", "--model", tiny_llama_gguf, "--data", reviews, "--label-words", "fresh= ,rotten=negative",
             "--threads", 1, check=False)
    assert r.returncode == 2 and "tokenizes to nothing" in r.stderr
    r = _cli("eval", "--model", tiny_llama_gguf, "--data", reviews, "--adapter", reviews, "--threads", 1,
             "--label-words", "fresh=positive,rotten=negative", check=False)
    assert r.returncode == 2 and "not a GGUF" in r.stderr
    r = _cli("train", "--model", tiny_llama_gguf, "--data", reviews, "--steps", 2, "--out", tmp_path / "x.gguf",
             "--resume", "--threads", 1, "--label-words", "fresh=positive,rotten=negative", check=False)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_peak_rss_of_a_child_is_its_own() -> None:
    """A child of a big parent reports its own peak, not the parent's (ru_maxrss is inherited across exec)."""
    # Prepare: this process touches 400 MiB, so its high-water mark is far above a bare interpreter's
    ballast = bytearray(400 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])
    code = "from edge.train import peak_rss_mb; print(peak_rss_mb())"

    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    # Assert: the child (numpy + llama_cpp imported) stays far below the parent's 400 MiB
    assert float(out) < 250.0
    del ballast


def test_malformed_rows_are_reported_by_line_and_reading_goes_on(tmp_path):
    """A CSV with a bad row in the middle keeps every good row after it; each skipped row has its line number."""
    f = tmp_path / "d.csv"
    f.write_text('text,label\na good film,fresh\n"one, two",fresh,extra\n' + "x" * 200_000 + ',rotten\n'
                 '"multi\nline text",rotten\n,fresh\nlast good row,rotten\n')  # line 4: over csv's field limit
    ds = load_rows(f, labels={"fresh", "rotten"})
    assert [r.text for r in ds.rows] == ["a good film", "multi\nline text", "last good row"]
    assert [line for line, _ in ds.problems] == [3, 4, 7]
    assert "3 fields, the header has 2" in ds.problems[0][1] and "empty text" == ds.problems[2][1]
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "ok", "label": "fresh"}\n{broken\n[1]\n{"text": "also ok", "label": "rotten"}\n')
    dj = load_rows(j, labels={"fresh", "rotten"})
    assert len(dj.rows) == 2 and [line for line, _ in dj.problems] == [2, 3]


def test_corrupt_or_truncated_compressed_data_is_one_clear_line(tiny_llama_gguf, reviews, tmp_path):
    import gzip

    good = gzip.compress(("text,label\n" + "".join(f"review {i},fresh\n" for i in range(400))).encode())
    trunc = tmp_path / "t.csv.gz"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"t.csv.gz: corrupt or truncated file after line \d+"):
        load_rows(trunc)
    junk = tmp_path / "j.csv.gz"
    junk.write_bytes(b"not gzip at all")
    r = _cli(*_train_args(tiny_llama_gguf, junk, tmp_path / "a.gguf", 2), check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edgezo: error: ") and "j.csv.gz: corrupt or truncated file after line 0" in last
    assert "Traceback" not in r.stderr
