"""Tasks: how a row becomes tokens, and the loss one llama.cpp pass gives for a mini-batch.

Classification (as MeZO on SST-2): ``template.format(text=...)`` then the label word; the loss is the
cross-entropy over the label words' logits at the prompt's last position. Generation: prompt + completion,
token cross-entropy over the completion tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge.data import Row
from edge.runtime import Runtime

DEFAULT_TEMPLATE = "Review: {text}\nSentiment (positive or negative):"


class TaskError(ValueError):
    """The task cannot be built (e.g. a label word that tokenizes to nothing)."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: the tokens, the positions whose logits are needed, and what they should predict.

    Classification: ``targets = (class index,)`` at the single position. Generation: next-token ids.
    """

    tokens: tuple[int, ...]
    want: tuple[int, ...]
    targets: tuple[int, ...]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class ClassificationTask:
    """Prompt template + one label word per class; the loss is CE over the label words' logits."""

    kind = "classification"

    def __init__(self, rt: Runtime, label_words: Mapping[str, str], template: str = DEFAULT_TEMPLATE, max_chars: int = 1000) -> None:
        if len(label_words) < 2:
            raise TaskError(f"need at least two labels, got {dict(label_words)}")
        if "{text}" not in template:
            raise TaskError(f"template must contain '{{text}}': {template!r}")
        self.rt, self.template, self.max_chars = rt, template, max_chars
        self.labels = list(label_words)
        self.words = [label_words[k] for k in self.labels]
        ids: list[int] = []
        for label, word in zip(self.labels, self.words, strict=False):
            w = word if word.startswith(" ") else " " + word
            toks = rt.tokenize(w)
            if not toks or not word.strip():
                raise TaskError(f"label word {word!r} (label {label!r}) tokenizes to nothing")
            ids.append(toks[0])  # the word's first token decides, as in MeZO
        if len(set(ids)) != len(ids):
            raise TaskError(f"label words {self.words} share a first token {ids}; pick distinct words")
        self.cols = ids
        self._bos = rt.bos()

    def encode(self, row: Row) -> Encoded:
        prompt = self.template.format(text=row.text[: self.max_chars])
        toks = self._bos + self.rt.tokenize(prompt)
        return Encoded(tuple(toks), (len(toks) - 1,), (self.labels.index(row.label),))

    def scores(self, batch: Sequence[Encoded]) -> np.ndarray:
        """(n, K) label-word logits, one pass."""
        return self.rt.logits([e.tokens for e in batch], [e.want for e in batch], cols=self.cols)

    def loss(self, batch: Sequence[Encoded]) -> float:
        return self.loss_from(self.scores(batch), batch)

    def loss_from(self, s: np.ndarray, batch: Sequence[Encoded]) -> float:
        """The loss from logits at ``want`` restricted to ``cols`` (n, K): how a tail pass's output is scored."""
        y = np.array([e.targets[0] for e in batch])
        return float(-_log_softmax(s)[np.arange(len(batch)), y].mean())

    def evaluate(self, batches: Sequence[Sequence[Encoded]]) -> dict[str, float]:
        """accuracy, calibrated accuracy (best decision threshold / per-class bias), loss, n."""
        s = np.concatenate([self.scores(b) for b in batches], axis=0)  # (n, K)
        y = np.array([e.targets[0] for b in batches for e in b])
        return classification_metrics(s, y)


def classification_metrics(s: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics from label-word scores (n, K) and class indices (n,).

    Calibrated accuracy fixes only the decision rule: for two classes the best threshold on s1 − s0 (the
    "fixing the threshold" baseline), for more classes log-probs centred by their per-class mean.
    """
    lp = _log_softmax(s)
    n = len(y)
    acc = float((s.argmax(1) == y).mean())
    if s.shape[1] == 2:
        margin = lp[:, 1] - lp[:, 0]
        order = np.argsort(margin)
        m, yy = margin[order], y[order]
        # threshold below position i: predict 1 for i.. n-1. correct = (#0 before i) + (#1 from i).
        zeros_before = np.concatenate([[0], np.cumsum(yy == 0)])
        ones_from = np.concatenate([np.cumsum((yy == 1)[::-1])[::-1], [0]])
        valid = np.concatenate([[True], m[1:] > m[:-1], [True]])  # only cut between distinct values
        cal = float(((zeros_before + ones_from)[valid]).max() / n)
    else:
        cal = float(((lp - lp.mean(0, keepdims=True)).argmax(1) == y).mean())
    return {
        "accuracy": acc,
        "calibrated_accuracy": cal,
        "loss": float(-lp[np.arange(n), y].mean()),
        "n": int(n),
        "predicted_fraction": [float((s.argmax(1) == k).mean()) for k in range(s.shape[1])],
    }


class GenerationTask:
    """Prompt + completion; the loss is the mean token cross-entropy over the completion tokens."""

    kind = "generation"

    def __init__(self, rt: Runtime, template: str = "{text}", max_chars: int = 2000) -> None:
        self.rt, self.template, self.max_chars = rt, template, max_chars
        self._bos = rt.bos()

    def encode(self, row: Row) -> Encoded:
        prompt = self._bos + self.rt.tokenize(self.template.format(text=row.text[: self.max_chars]))
        completion = self.rt.tokenize(row.label)
        if not completion:
            raise TaskError(f"completion {row.label!r} tokenizes to nothing")
        toks = prompt + completion
        want = tuple(range(len(prompt) - 1, len(toks) - 1))
        return Encoded(tuple(toks), want, tuple(completion))

    cols = None  # the loss needs the full vocabulary

    def _token_nll(self, batch: Sequence[Encoded], logits: np.ndarray | None = None) -> np.ndarray:
        if logits is None:
            logits = self.rt.logits([e.tokens for e in batch], [e.want for e in batch])  # (sum targets, V)
        tgt = np.array([t for e in batch for t in e.targets])
        return -_log_softmax(logits)[np.arange(len(tgt)), tgt]

    def loss(self, batch: Sequence[Encoded]) -> float:
        return float(self._token_nll(batch).mean())

    def loss_from(self, logits: np.ndarray, batch: Sequence[Encoded]) -> float:
        """The loss from logits at ``want`` (sum targets, V): how a tail pass's output is scored."""
        return float(self._token_nll(batch, logits).mean())

    def evaluate(self, batches: Sequence[Sequence[Encoded]]) -> dict[str, float]:
        nll = np.concatenate([self._token_nll(b) for b in batches])
        return {"loss": float(nll.mean()), "perplexity": float(np.exp(nll.mean())), "n": sum(len(b) for b in batches)}
