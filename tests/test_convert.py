"""convert package: HF/PEFT ⇄ GGUF checked against transformers/PEFT through real llama.cpp evaluation.

Tiny random models (2 layers, hidden 64, GQA) with the real SmolLM2 tokenizer; no mocks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.cli import main as edgezo
from convert.errors import ConvertError
from convert.hfio import read_hf_tensors, read_safetensors_file
from convert.llama_eval import LlamaEval

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- helpers -----------------------------------------------------------------------------------------
def token_ids(n: int = 48, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, 49152, n)]


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kl(ref: np.ndarray, other: np.ndarray) -> float:
    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(other.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def leftovers(folder: Path) -> list[str]:
    """Temp files a conversion may have left beside its output."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="session")
def tiny_llama_untied_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama_untied_dir: Path) -> Path:
    from convert.hf_to_gguf import hf_to_gguf

    return hf_to_gguf(tiny_llama_untied_dir, tmp_path_factory.mktemp("untied") / "untied.gguf")


MODELS = {  # name -> (HF folder fixture, F32 GGUF fixture)
    "llama_tied": ("tiny_llama_dir", "tiny_llama_gguf"),
    "llama_untied": ("tiny_llama_untied_dir", "tiny_llama_untied_gguf"),
    "qwen2": ("tiny_qwen2_dir", "tiny_qwen2_gguf"),
}


# ---- 1. logits parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_f32_gguf_logits_match_transformers(request: pytest.FixtureRequest, name: str) -> None:
    # Prepare
    hf_dir, gguf_path = (request.getfixturevalue(f) for f in MODELS[name])
    ids = token_ids()
    ref = torch_logits(hf_model(hf_dir), ids)
    # Execute
    with LlamaEval(gguf_path) as ev:
        got = ev.logits(ids)
    # Assert
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("name", ["llama_tied", "qwen2"])
def test_q8_0_tracks_transformers(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    # Prepare: 256 positions. These random nets (weights std 0.2) are chaotic and their 49k logits are
    # near-ties (median top-2 gap ~0.27 vs a Q8_0 logit error ~0.06), so top-1 agreement measures ~0.85-0.94
    # here; the real-model test holds the tighter bound.
    from convert.hf_to_gguf import hf_to_gguf

    hf_dir = request.getfixturevalue(MODELS[name][0])
    ids = token_ids(256, seed=1)
    ref = torch_logits(hf_model(hf_dir), ids)
    # Execute
    q8 = hf_to_gguf(hf_dir, tmp_path / "q8.gguf", "q8_0")
    with LlamaEval(q8) as ev:
        got = ev.logits(ids)
    # Assert
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8
    assert mean_kl(ref, got) < 0.05
    assert leftovers(tmp_path) == []


# ---- 2. tokenization parity -------------------------------------------------------------------------------
def test_tokenization_matches_transformers(tiny_llama_gguf: Path, tokenizer_dir: Path, tokenizer_texts: list[str]) -> None:
    # Prepare
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Execute
    with LlamaEval(tiny_llama_gguf, vocab_only=True) as ev:
        pairs = [(t, tok(t, add_special_tokens=True).input_ids, ev.tokenize(t)) for t in tokenizer_texts]
    # Assert
    bad = [(t, hf, ll) for t, hf, ll in pairs if hf != ll]
    assert len(pairs) >= 300
    assert bad == []


# ---- 3. LoRA parity ---------------------------------------------------------------------------------------
def make_peft(hf_dir: Path, out: Path):
    """(PEFT model in eval mode, saved adapter folder): rank 8 on all seven projections, B ≠ 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(hf_model(hf_dir), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return model.eval(), out


@pytest.fixture(scope="session")
def peft_llama(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    return make_peft(tiny_llama_dir, tmp_path_factory.mktemp("peft_llama"))


@pytest.fixture(scope="session")
def peft_qwen2(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path):
    return make_peft(tiny_qwen2_dir, tmp_path_factory.mktemp("peft_qwen2"))


@pytest.fixture(params=["llama_tied", "qwen2"])
def peft_adapter(request: pytest.FixtureRequest):
    """(model name, PEFT model, adapter folder) for each architecture."""
    fixture = {"llama_tied": "peft_llama", "qwen2": "peft_qwen2"}[request.param]
    return (request.param, *request.getfixturevalue(fixture))


def test_lora_gguf_logits_match_peft(request: pytest.FixtureRequest, peft_adapter, tmp_path: Path) -> None:
    # Prepare
    from convert.lora import peft_to_gguf

    name, model, adapter_dir = peft_adapter
    hf_dir, gguf_path = (request.getfixturevalue(f) for f in MODELS[name])
    ids = token_ids()
    ref = torch_logits(model, ids)
    # Execute
    lora = peft_to_gguf(adapter_dir, tmp_path / "lora.gguf", hf_dir)
    with LlamaEval(gguf_path, loras=[(lora, 1.0)]) as ev:
        got = ev.logits(ids)
    with LlamaEval(gguf_path) as ev:
        base = ev.logits(ids)
    # Assert: equal to PEFT, and the adapter really changes the output
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(base - ref).max() > 0.1


# ---- 4. round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_hf_gguf_hf_round_trip_is_bit_identical(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    # Prepare
    from convert.gguf_to_hf import gguf_to_hf

    hf_dir, gguf_path = (request.getfixturevalue(f) for f in MODELS[name])
    # Execute
    out = gguf_to_hf(gguf_path, tmp_path / "hf")
    # Assert
    a, b = read_hf_tensors(hf_dir), read_hf_tensors(out)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    keys = ["architectures", "hidden_size", "num_key_value_heads", "tie_word_embeddings", "vocab_size", "rms_norm_eps"]
    assert {k: cfg_a[k] for k in keys} == {k: cfg_b[k] for k in keys}
    assert (out / "tokenizer.json").is_file()


def test_gguf_to_hf_folder_loads_in_transformers(tiny_qwen2_dir: Path, tiny_qwen2_gguf: Path, tmp_path: Path) -> None:
    # Prepare
    from transformers import AutoTokenizer

    from convert.gguf_to_hf import gguf_to_hf

    ids = token_ids()
    # Execute
    out = gguf_to_hf(tiny_qwen2_gguf, tmp_path / "hf")
    got, ref = torch_logits(hf_model(out), ids), torch_logits(hf_model(tiny_qwen2_dir), ids)
    tok_a, tok_b = AutoTokenizer.from_pretrained(tiny_qwen2_dir), AutoTokenizer.from_pretrained(out)
    # Assert
    assert np.array_equal(got, ref)
    text = "<|im_start|>user\nIt's 2024, 你好 🚀<|im_end|>"
    assert tok_a(text).input_ids == tok_b(text).input_ids
    assert tok_a.chat_template == tok_b.chat_template


def test_peft_gguf_peft_round_trip_is_bit_identical(
    request: pytest.FixtureRequest, peft_adapter, tmp_path: Path
) -> None:
    # Prepare
    from convert.lora import gguf_to_peft, peft_to_gguf

    name, _, adapter_dir = peft_adapter
    hf_dir = request.getfixturevalue(MODELS[name][0])
    # Execute: back without --base (the GGUF written here carries the head counts it needs)
    lora = peft_to_gguf(adapter_dir, tmp_path / "lora.gguf", hf_dir)
    out = gguf_to_peft(lora, tmp_path / "peft")
    # Assert
    a = read_safetensors_file(adapter_dir / "adapter_model.safetensors")
    b = read_safetensors_file(out / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (8, 16.0, sorted(TARGETS))


def test_gguf_peft_folder_loads_in_peft(peft_adapter, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Prepare
    from peft import PeftModel

    from convert.lora import gguf_to_peft, peft_to_gguf

    name, model, adapter_dir = peft_adapter
    hf_dir = request.getfixturevalue(MODELS[name][0])
    ids = token_ids()
    # Execute
    out = gguf_to_peft(peft_to_gguf(adapter_dir, tmp_path / "lora.gguf", hf_dir), tmp_path / "peft", hf_dir)
    reloaded = PeftModel.from_pretrained(hf_model(hf_dir), out).eval()
    # Assert
    assert np.array_equal(torch_logits(reloaded, ids), torch_logits(model, ids))


# ---- lora_gguf (the edge's module) ----------------------------------------------------------------------
def test_write_read_lora_gguf_keeps_peft_layout_and_permutes_qk_for_llama(tmp_path: Path) -> None:
    # Prepare
    import gguf

    from convert.arch import qk_row_perm
    from convert.lora_gguf import lora_row_perms, read_lora_gguf, write_lora_gguf

    rng = np.random.default_rng(0)
    tensors = {
        "blk.0.attn_q.weight.lora_a": rng.standard_normal((4, 64), dtype=np.float32),
        "blk.0.attn_q.weight.lora_b": rng.standard_normal((64, 4), dtype=np.float32),
        "blk.1.ffn_down.weight.lora_a": rng.standard_normal((4, 128), dtype=np.float32),
        "blk.1.ffn_down.weight.lora_b": rng.standard_normal((64, 4), dtype=np.float32),
    }
    # Execute
    path = write_lora_gguf(tmp_path / "a.gguf", tensors, 8.0, "llama", n_head=4, n_head_kv=2)
    back, alpha, arch = read_lora_gguf(path)
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    # Assert
    assert (alpha, arch) == (8.0, "llama")
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    assert np.array_equal(raw["blk.0.attn_q.weight.lora_b"], tensors["blk.0.attn_q.weight.lora_b"][qk_row_perm(64, 4)])
    assert np.array_equal(raw["blk.1.ffn_down.weight.lora_b"], tensors["blk.1.ffn_down.weight.lora_b"])
    pairs = lora_row_perms([(n, a.shape[0]) for n, a in tensors.items()], "llama", 4, 2)  # the edge's call
    assert list(pairs) == ["blk.0.attn_q.weight.lora_b"]
    assert np.array_equal(pairs["blk.0.attn_q.weight.lora_b"], qk_row_perm(64, 4))
    assert leftovers(tmp_path) == []


def test_write_lora_gguf_needs_head_counts_for_llama_qk(tmp_path: Path) -> None:
    # Prepare
    from convert.lora_gguf import write_lora_gguf

    t = {"blk.0.attn_k.weight.lora_a": np.zeros((2, 64), np.float32),
         "blk.0.attn_k.weight.lora_b": np.zeros((32, 2), np.float32)}
    # Execute / Assert
    with pytest.raises(ConvertError, match="n_head_kv"):
        write_lora_gguf(tmp_path / "a.gguf", t, 4.0, "llama")
    assert list(tmp_path.iterdir()) == []


def test_lora_gguf_module_does_not_import_torch() -> None:
    # Prepare / Execute: a fresh interpreter, as on an edge device
    code = "import sys, convert.lora_gguf, convert.quantize; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    assert out.stdout.strip() == "False"


# ---- atomic writes (convert.atomic: every durable write in the project) ------------------------------
def test_atomic_writes_replace_whole_files_with_ordinary_permissions(tmp_path: Path) -> None:
    import os

    from convert.atomic import atomic_open, atomic_write_bytes

    # Prepare
    dst = tmp_path / "sub" / "state.bin"
    mask = os.umask(0o022)
    try:
        # Execute
        atomic_write_bytes(dst, b"old")
        with atomic_open(dst) as f:
            np.savez(f, x=np.arange(3))  # a file object: np.savez adds no ".npz" to the name
        with atomic_open(tmp_path / "a.json", "w", encoding="utf-8") as f:
            json.dump({"a": 1}, f)
    finally:
        os.umask(mask)
    # Assert
    with np.load(dst) as z:
        assert z["x"].tolist() == [0, 1, 2]
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}
    assert (dst.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "state.bin", "sub"]


def test_an_error_mid_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path: Path) -> None:
    from convert.atomic import atomic_open, atomic_write_bytes

    # Prepare
    dst = atomic_write_bytes(tmp_path / "lead.npz", b"old")
    # Execute
    with pytest.raises(RuntimeError), atomic_open(dst) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    # Assert
    assert dst.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["lead.npz"]
    with pytest.raises(ValueError, match="whole new file"), atomic_open(dst, "ab"):
        pass


# ---- CLI ------------------------------------------------------------------------------------------------
def test_cli_converts_every_direction(tiny_llama_dir: Path, peft_llama, tmp_path: Path) -> None:
    # Prepare
    _, adapter_dir = peft_llama
    g, q, hf, lora, peft = (tmp_path / n for n in ("m.gguf", "m-q4_k_m.gguf", "hf", "l.gguf", "peft"))
    # Execute
    codes = [
        edgezo(["convert", str(tiny_llama_dir), str(g)]),
        edgezo(["convert", str(g), str(q), "--type", "q4_k_m"]),
        edgezo(["convert", str(q), str(hf)]),
        edgezo(["convert", str(adapter_dir), str(lora), "--base", str(g)]),
        edgezo(["convert", str(lora), str(peft)]),
    ]
    # Assert
    assert codes == [0] * 5
    assert q.stat().st_size < g.stat().st_size / 2  # the tokenizer metadata (~2 MB) is not quantized
    assert (hf / "model.safetensors").is_file() and (peft / "adapter_model.safetensors").is_file()
    assert leftovers(tmp_path) == []


# ---- bad input ------------------------------------------------------------------------------------------
def _fail(argv: list[str], capsys: pytest.CaptureFixture, dst: Path, match: str) -> None:
    code = edgezo(["convert", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert match in err, err
    assert not dst.exists()
    assert not dst.parent.exists() or leftovers(dst.parent) == []


def test_corrupt_gguf_is_a_clear_error(tiny_llama_gguf: Path, tmp_path: Path, capsys) -> None:
    # Prepare: garbage, and a real GGUF cut in half
    junk, cut = tmp_path / "junk.gguf", tmp_path / "cut.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    cut.write_bytes(tiny_llama_gguf.read_bytes()[: tiny_llama_gguf.stat().st_size // 2])
    out = tmp_path / "out"
    # Execute / Assert
    _fail([str(junk), str(out / "a")], capsys, out / "a", "not a valid GGUF")
    _fail([str(cut), str(out / "b")], capsys, out / "b", "not a valid GGUF")
    # llama.cpp's own loader (quantize) reports it too, and leaves nothing behind
    from convert.quantize import quantize_gguf

    with pytest.raises(ConvertError, match="failed to quantize"):
        quantize_gguf(cut, tmp_path / "q.gguf", "q8_0")
    assert not (tmp_path / "q.gguf").exists() and leftovers(tmp_path) == []


def test_missing_config_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    # Prepare
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    (src / "config.json").unlink()
    # Execute / Assert
    _fail([str(src), str(tmp_path / "m.gguf")], capsys, tmp_path / "m.gguf", "config.json")
    _fail([str(tmp_path / "nope"), str(tmp_path / "m.gguf")], capsys, tmp_path / "m.gguf", "not found")


def test_unsupported_architecture_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    # Prepare
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(cfg))
    # Execute / Assert
    _fail([str(src), str(tmp_path / "m.gguf")], capsys, tmp_path / "m.gguf", "unsupported architecture ['GPT2LMHeadModel']")


def test_lora_shape_mismatch_is_a_clear_error(peft_llama, tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    # Prepare: a base whose MLP is wider than the adapter's
    _, adapter_dir = peft_llama
    base = tmp_path / "base"
    base.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    dst = tmp_path / "l.gguf"
    # Execute / Assert
    _fail([str(adapter_dir), str(dst), "--base", str(base)], capsys, dst, "does not fit the base model")


def test_failure_keeps_an_existing_output_intact(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    # Prepare: a good output exists; a later conversion into the same path fails half-way (bad tokenizer)
    dst = tmp_path / "m.gguf"
    assert edgezo(["convert", str(tiny_llama_dir), str(dst)]) == 0
    before = dst.read_bytes()
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    (src / "tokenizer.json").write_text("{not json")
    # Execute
    code = edgezo(["convert", str(src), str(dst)])
    # Assert
    assert code == 2 and "tokenizer.json" in capsys.readouterr().err
    assert dst.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("out_type", "tol"), [("f16", 0.06), ("bf16", 0.6)])
def test_half_precision_gguf_stays_close(tiny_llama_dir: Path, tmp_path: Path, out_type: str, tol: float) -> None:
    # Prepare
    from convert.hf_to_gguf import hf_to_gguf

    ids = token_ids()
    ref = torch_logits(hf_model(tiny_llama_dir), ids)
    # Execute
    path = hf_to_gguf(tiny_llama_dir, tmp_path / f"{out_type}.gguf", out_type)
    with LlamaEval(path) as ev:
        got = ev.logits(ids)
    # Assert: half the F32 file, logits within the format's rounding
    assert path.stat().st_size < 0.6 * 14.7e6
    assert np.abs(got - ref).max() < tol


def test_os_errors_are_one_line_and_leave_nothing_behind(tiny_llama_gguf: Path, tmp_path: Path, capsys) -> None:
    """A file where the output's folder should be (root ignores permission bits, so this is the OS error a test
    can cause on any machine): exit 2, one line naming the path, no traceback, the file untouched."""
    # Prepare
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"keep me")
    # Execute
    code = edgezo(["convert", str(tiny_llama_gguf), str(blocker / "out.gguf"), "--type", "q8_0"])
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("edgezo convert: error:") and str(blocker) in err, err
    assert "Traceback" not in err
    assert blocker.read_bytes() == b"keep me" and leftovers(tmp_path) == []
