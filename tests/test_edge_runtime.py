"""Runtime: the AMX guard, clear errors for bad GGUFs, quantized models run (in a subprocess), and in-place
adapter writes equal a reloaded adapter file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edge.adapter import LoraAdapter, infer_spec, read_adapter_gguf, write_adapter_gguf
from edge.runtime import Runtime, RuntimeConfig, RuntimeErrorEZ, needs_amx_guard, safe_model_params
from protocol.spec import AdapterSpec, ModelDims


def test_amx_guard_decision():
    amx = b"CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    plain = b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | REPACK = 1 | "
    assert needs_amx_guard(amx) and not needs_amx_guard(plain)
    assert safe_model_params(amx).use_extra_bufts is False
    assert safe_model_params(plain).use_extra_bufts is True


def run_selfcheck(model) -> subprocess.CompletedProcess:
    """``python -m edge.runtime MODEL``: load + decode in a child process (a segfault fails, not kills, pytest)."""
    return subprocess.run([sys.executable, "-m", "edge.runtime", str(model)], capture_output=True, text=True, timeout=300)


def test_quantized_model_runs_in_subprocess(tiny_llama_gguf, tmp_path):
    """A quantized model decodes without crashing (a segfault, e.g. AMX, fails this test, not pytest)."""
    from convert.quantize import quantize_gguf

    q = quantize_gguf(tiny_llama_gguf, tmp_path / "tiny-q8_0.gguf", "q8_0", nthread=1)
    r = run_selfcheck(q)
    assert r.returncode == 0 and "OK" in r.stdout, f"rc={r.returncode}\n{r.stderr[-2000:]}"


def test_bad_model_files(tmp_path):
    with pytest.raises(RuntimeErrorEZ, match="not found"):
        Runtime(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(RuntimeErrorEZ, match="not a GGUF"):
        Runtime(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 10)
    with pytest.raises(RuntimeErrorEZ, match="could not load"):
        Runtime(trunc)


@pytest.fixture(scope="module")
def rt(tiny_llama_gguf):
    r = Runtime(tiny_llama_gguf, RuntimeConfig(n_ctx=256, n_seq_max=4, n_threads=1, exact=True))
    yield r
    r.close()


def test_inplace_writes_equal_reloaded_file(rt, tmp_path):
    """Over many random θ, logits with θ written in place == logits with θ loaded from a GGUF file (1e-5)."""
    spec = AdapterSpec("lora", rt.dims(), rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    seqs = [rt.bos() + rt.tokenize("the quick brown fox"), rt.bos() + rt.tokenize("jumps over")]
    want = [list(range(len(s))) for s in seqs]
    live = LoraAdapter(rt, spec, spec.init(0))
    base = rt.logits(seqs, want)
    rng = np.random.default_rng(0)
    theta = spec.flatten(spec.init(0))
    worst = 0.0
    for i in range(12):
        theta = theta + (0.05 * rng.standard_normal(spec.d)).astype(np.float32)
        live.write(theta)
        got = rt.logits(seqs, want)
        if i % 3 == 0:  # reload a fresh adapter from a file with the same values
            f = tmp_path / f"a{i}.gguf"
            write_adapter_gguf(f, spec, spec.unflatten(theta), rt.arch)
            tensors, alpha, arch = read_adapter_gguf(f, spec.dims)
            assert arch == rt.arch and alpha == spec.alpha
            for k, v in spec.unflatten(theta).items():
                np.testing.assert_array_equal(tensors[k], v)
            ref = LoraAdapter(rt, spec, tensors)  # sets itself on the context
            want_logits = rt.logits(seqs, want)
            ref.close()
            live._set(live.handle)
            worst = max(worst, float(np.abs(got - want_logits).max()))
    assert worst <= 1e-5, worst
    assert np.abs(got - base).max() > 1e-2  # the writes did change the model
    live.close()


def test_adapter_for_another_model_is_refused(rt, tmp_path):
    other = ModelDims(n_layers=2, hidden=128, intermediate=256, n_heads=4, n_kv_heads=2)
    spec = AdapterSpec("lora", other, rank=2, alpha=4.0)
    f = tmp_path / "other.gguf"
    write_adapter_gguf(f, spec, spec.init(0), "llama")
    tensors, alpha, _ = read_adapter_gguf(f)
    with pytest.raises(RuntimeErrorEZ, match="does not fit|shape"):
        infer_spec(tensors, alpha, rt.dims())
    with pytest.raises(RuntimeErrorEZ, match="dims"):
        LoraAdapter(rt, AdapterSpec("lora", other, rank=2, alpha=4.0), tensors)
    g = tmp_path / "qwen.gguf"
    mine = AdapterSpec("lora", rt.dims(), rank=2, alpha=4.0, targets=("v_proj",))
    write_adapter_gguf(g, mine, mine.init(0), "qwen2")
    _, _, arch = read_adapter_gguf(g)
    assert arch == "qwen2" != rt.arch


def test_fit_context_sizes_the_kv_cache_to_the_data_and_keeps_logits(tiny_llama_gguf):
    """fit_context: the smallest power of two (≥ 256) holding the batch's longest sequences in one decode; the
    logits of a batch do not change; the weights' file pages are dropped after load (drop_file_pages)."""
    from edge.runtime import drop_file_pages

    rt = Runtime(tiny_llama_gguf, RuntimeConfig(n_ctx=2048, n_seq_max=8, n_threads=1, exact=True))
    seqs = [rt.bos() + rt.tokenize(f"review number {i}: " + "fine " * (3 * i)) for i in range(6)]
    want = [[len(s) - 1] for s in seqs]
    before = rt.logits(seqs, want)
    lengths = [len(s) for s in seqs]
    assert rt.fit_context(lengths, 4) == max(256, 1 << (sum(sorted(lengths)[-4:]) - 1).bit_length())
    assert rt.fit_context([300] * 10, 4) == 2048 and rt.config.n_ctx == 2048  # 1,200 tokens → 2,048
    assert rt.fit_context([10] * 3, 4) == 256
    np.testing.assert_allclose(rt.logits(seqs, want), before, atol=1e-5)
    assert rt.passes["forward"] == 2
    assert drop_file_pages(tiny_llama_gguf) > 0 and drop_file_pages("/nonexistent") == 0  # rt maps the file
    rt.close()
