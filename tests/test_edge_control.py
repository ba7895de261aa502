"""Control vectors on the edge: llama.cpp's per-layer residual directions equal torch forward hooks, in-place
writes take effect without reloading, and the CLI trains one, saves it, and evaluates it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge.adapter import ControlAdapter, adapter_kind, read_control_gguf, write_control_gguf
from edge.runtime import Runtime, RuntimeConfig, RuntimeErrorEZ
from protocol.spec import AdapterSpec, ModelDims


@pytest.fixture(scope="module")
def rt(tiny_llama_gguf):
    r = Runtime(tiny_llama_gguf, RuntimeConfig(n_ctx=256, n_seq_max=4, n_threads=1, exact=True))
    yield r
    r.close()


def torch_logits_with_control(hf_dir, ids: list[int], vectors: dict[int, np.ndarray]) -> np.ndarray:
    """HF logits with ``vectors[il]`` added to decoder layer il's output (the residual stream)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def hook(il):
        def add(_module, _inp, out):
            v = torch.from_numpy(vectors[il])
            return (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
        return add

    handles = [model.model.layers[il].register_forward_hook(hook(il)) for il in vectors]
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].numpy()
    for h in handles:
        h.remove()
    return out


def test_control_vector_matches_torch_and_writes_in_place(rt, tiny_llama_dir):
    # Prepare
    spec = AdapterSpec("control", rt.dims(), layers=tuple(range(1, rt.n_layer)))
    ids = rt.bos() + rt.tokenize("a control vector shifts the residual stream")
    want = [list(range(len(ids)))]
    cvec = ControlAdapter(rt, spec, spec.init(0))
    base = rt.logits([ids], want)
    rng = np.random.default_rng(0)
    worst = 0.0
    # Execute: several θ written in place, each compared with torch hooks adding the same vectors
    for _ in range(3):
        theta = (0.5 * rng.standard_normal(spec.d)).astype(np.float32)
        cvec.write(theta)
        got = rt.logits([ids], want)
        vectors = {i.layer: theta[i.offset : i.offset + i.size] for i in spec.tensors}
        ref = torch_logits_with_control(tiny_llama_dir, ids, vectors)
        worst = max(worst, float(np.abs(got - ref).max()))
    cvec.close()
    cleared = rt.logits([ids], want)
    # Assert
    assert worst <= 1e-4, worst
    assert np.abs(got - base).max() > 1e-2  # the vector did change the model
    np.testing.assert_allclose(cleared, base, atol=1e-6)  # close() removes it


def test_control_vector_file_round_trip_and_errors(rt, tmp_path):
    spec = AdapterSpec("control", rt.dims(), layers=(1,))
    tensors = {"direction.1": np.arange(rt.n_embd, dtype=np.float32)}
    f = tmp_path / "cv.gguf"
    write_control_gguf(f, spec, tensors, rt.arch)
    spec2, back, hint = read_control_gguf(f, rt.dims())
    assert adapter_kind(f) == "control" and hint == rt.arch and spec2 == spec
    np.testing.assert_array_equal(back["direction.1"], tensors["direction.1"])
    with pytest.raises(ValueError, match="layer 0"):
        ControlAdapter(rt, AdapterSpec("control", rt.dims(), layers=(0,)), {"direction.0": tensors["direction.1"]})
    wide = ModelDims(n_layers=rt.n_layer, hidden=2 * rt.n_embd, intermediate=8, n_heads=4, n_kv_heads=2)
    with pytest.raises(RuntimeErrorEZ, match="width|fit"):
        read_control_gguf(f, wide)


def test_cli_trains_and_evaluates_a_control_vector(tiny_llama_gguf, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": t, "label": "fresh"} for t in ("great", "superb film", "a joy")]
    rows += [{"text": t, "label": "rotten"} for t in ("dull", "a boring mess", "tedious")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "cv.gguf"
    common = ["--model", tiny_llama_gguf, "--data", data, "--label-words", "fresh=positive,rotten=negative",
              "--threads", 1, "--n-ctx", 256, "--batch-size", 4]
    common = [str(a) for a in common]
    train = ["--kind", "control", "--steps", "3", "--out", str(out), "--eval-fraction", "0.34", "--no-progress",
             "--eps", "0.1", "--lr", "0.1"]
    r = subprocess.run([sys.executable, "-m", "app", "train", *common, *train],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert adapter_kind(out) == "control"
    _, tensors, _ = read_control_gguf(out, Runtime(tiny_llama_gguf, RuntimeConfig(n_ctx=64, n_seq_max=1)).dims())
    assert any(np.abs(v).max() > 0 for v in tensors.values())  # training moved the vector off zero
    e = subprocess.run([sys.executable, "-m", "app", "eval", *common, "--adapter", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert e.returncode == 0, e.stderr[-2000:]
    assert json.loads(e.stdout.strip().splitlines()[-1])["n"] == 6
