"""Calibration of a classification adapter: the decision rule fitted on the edge's private validation split.

A classification task scores each example by its label words' first-token logits at the prompt's last
position (``ClassificationTask.scores``, shape (n, K)). The raw rule is the argmax; the calibrated rule adds
one bias per class before the argmax. For two classes that is a threshold on the margin ``s1 − s0`` (predict
class 1 iff ``s1 − s0 > threshold``; bias ``[0, −threshold]``); for K classes, per-class biases fitted by
coordinate ascent on validation accuracy (class 0's bias is fixed at 0).

The calibration is saved next to the adapter as ``<adapter>.calib.json`` and used by ``edgezo eval``. A
difference of log-softmax values equals the difference of the logits, so the same biases apply to logits at
serving time: ``serving_kwargs(calib)`` gives llama-cpp-python's ``create_completion`` arguments (one greedy
token, ``logit_bias`` = a large bonus on the label words' first tokens plus the calibrated biases), under which
the greedy answer is exactly the label ``predict`` gives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert.atomic import atomic_open

CALIB_VERSION = 1
CALIB_SUFFIX = ".calib.json"
SERVE_BONUS = 100.0  # added to every label token's logit at serving time: far above any logit gap


class CalibrationError(ValueError):
    """A calibration file cannot be used (missing, malformed, or for another task)."""


def calibration_path(adapter: str | os.PathLike) -> Path:
    """Where the calibration of ``adapter`` lives: ``<adapter path>.calib.json``."""
    p = Path(adapter)
    return p.with_name(p.name + CALIB_SUFFIX)


def _best_bias(c: np.ndarray, pos: np.ndarray, neg: np.ndarray, current: float) -> tuple[float, int]:
    """The bias b maximising ``#{pos: c < b} + #{neg: c > b}``, and that count.

    ``c``: each example's critical bias (the class wins iff b > c). ``pos``: examples the class should win,
    ``neg``: examples it should lose (and that are then right). Among the best intervals between distinct
    values of ``c``, ``current`` is kept if it lies in one, else the best interval's midpoint closest to it.
    """
    order = np.argsort(c, kind="stable")
    cs, ps, ns = c[order], pos[order], neg[order]
    n = len(cs)
    # cut k (0..n): b between cs[k-1] and cs[k]; wins the first k examples.
    pos_before = np.concatenate([[0], np.cumsum(ps)])
    neg_from = np.concatenate([np.cumsum(ns[::-1])[::-1], [0]])
    correct = pos_before + neg_from
    valid = np.concatenate([[True], cs[1:] > cs[:-1], [True]]) if n else np.array([True])
    best = int(correct[valid].max())
    cur_k = int(np.searchsorted(cs, current, side="left"))  # b = current wins exactly c < current
    cur_ok = valid[cur_k] and (cur_k == 0 or cs[cur_k - 1] < current) and (cur_k == n or current <= cs[cur_k])
    if cur_ok and correct[cur_k] == best and (cur_k == n or current < cs[cur_k]):
        return float(current), best
    cands = []
    for k in np.nonzero(valid & (correct == best))[0]:
        lo = cs[k - 1] if k > 0 else None
        hi = cs[k] if k < n else None
        if lo is None and hi is None:
            b = current
        elif lo is None:
            b = hi - 1.0
        elif hi is None:
            b = lo + 1.0
        else:
            b = 0.5 * (lo + hi)
        cands.append(float(b))
    return min(cands, key=lambda b: abs(b - current)), best


def fit_biases(scores: np.ndarray, labels: np.ndarray, rounds: int = 5) -> np.ndarray:
    """Per-class additive biases (K,) maximising accuracy of ``argmax(scores + bias)``; bias[0] = 0.

    Two classes: the one best threshold on the margin (exact). K > 2: coordinate ascent over classes 1..K−1,
    each step exact in its coordinate, so validation accuracy never decreases. Ties keep the raw rule.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.int64)
    if s.ndim != 2 or s.shape[1] < 2 or len(s) != len(y):
        raise ValueError(f"need scores (n, K≥2) and labels (n,), got {s.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"labels must be class indices in 0..{s.shape[1] - 1}")
    k_cls = s.shape[1]
    bias = np.zeros(k_cls)
    if not len(y):
        return bias
    for _ in range(rounds if k_cls > 2 else 1):
        changed = False
        for k in range(1, k_cls):
            others = np.delete(s + bias, k, axis=1)
            other_idx = np.delete(np.arange(k_cls), k)[others.argmax(1)]
            c = others.max(1) - s[:, k]  # class k wins iff bias_k > c (strict: argmax keeps the lower index)
            new, _ = _best_bias(c, y == k, (y != k) & (other_idx == y), bias[k])
            changed |= new != bias[k]
            bias[k] = new
        if not changed:
            break
    return bias


def _predict(scores: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (np.asarray(scores, np.float64) + bias).argmax(1)


@dataclass
class Calibration:
    """The calibrated decision rule of one classification adapter, and how to serve it.

    ``bias[k]`` is added to class k's label-word logit before the argmax; for two classes
    ``threshold = −bias[1]`` (predict ``labels[1]`` iff ``s1 − s0 > threshold``).
    """

    template: str
    labels: list[str]
    label_words: list[str]
    token_ids: list[int]
    bias: list[float]
    threshold: float | None = None
    n_val: int = 0
    val_accuracy_raw: float | None = None
    val_accuracy_calibrated: float | None = None
    max_chars: int = 1000
    version: int = CALIB_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- fitting / prediction -----------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        scores: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        *,
        template: str,
        label_names: Sequence[str],
        label_words: Sequence[str],
        token_ids: Sequence[int],
        max_chars: int = 1000,
    ) -> Calibration:
        """Fit on validation scores (n, K) (label-word logits) and class indices (n,)."""
        s = np.asarray(scores, np.float64)
        y = np.asarray(labels, np.int64)
        if not (len(label_names) == len(label_words) == len(token_ids) == s.shape[1]):
            raise ValueError(f"{s.shape[1]} score columns but {len(label_names)} labels / {len(token_ids)} token ids")
        bias = fit_biases(s, y)
        n = len(y)
        raw = float((s.argmax(1) == y).mean()) if n else None
        cal = float((_predict(s, bias) == y).mean()) if n else None
        return cls(
            template=template, labels=list(label_names), label_words=list(label_words),
            token_ids=[int(t) for t in token_ids], bias=[float(b) for b in bias],
            threshold=float(-bias[1]) if s.shape[1] == 2 else None, n_val=int(n),
            val_accuracy_raw=raw, val_accuracy_calibrated=cal, max_chars=max_chars,
        )

    @classmethod
    def for_task(cls, task, scores: np.ndarray, labels: Sequence[int] | np.ndarray) -> Calibration:
        """Fit for a ``ClassificationTask`` (its template, labels, words and first token ids)."""
        return cls.fit(scores, labels, template=task.template, label_names=task.labels, label_words=task.words,
                       token_ids=task.cols, max_chars=task.max_chars)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated class indices (n,) of label-word scores (n, K)."""
        s = np.asarray(scores, np.float64)
        if s.ndim != 2 or s.shape[1] != len(self.bias):
            raise ValueError(f"scores must be (n, {len(self.bias)}), got {s.shape}")
        return _predict(s, np.asarray(self.bias))

    def check_task(self, task) -> None:
        """Raise CalibrationError unless ``task`` has this calibration's labels, words, tokens and template."""
        mine = (self.labels, self.label_words, self.token_ids)
        theirs = (list(task.labels), list(task.words), [int(t) for t in task.cols])
        if mine != theirs:
            raise CalibrationError(f"calibration is for labels/words/tokens {mine}, task has {theirs}")
        if self.template != task.template:
            raise CalibrationError(f"calibration was fitted with template {self.template!r}, task uses {task.template!r}")

    # ---- serving -------------------------------------------------------------------------------------
    def serve_prompt(self, text: str) -> str:
        """The exact prompt ``edgezo eval`` scores (template applied, text cut to ``max_chars``).

        llama-cpp-python's ``create_completion`` adds the BOS token itself, as eval does."""
        return self.template.format(text=text.strip()[: self.max_chars])

    def logit_bias(self, bonus: float = SERVE_BONUS) -> dict[int, float]:
        """``logit_bias`` for llama-cpp-python (added to the logits): label tokens get ``bonus`` + their bias.

        The biases are shifted so the smallest is ``bonus``; greedy decoding then picks a label token (any
        other token would need a logit ``bonus`` above the label tokens'), and among them exactly the class
        ``predict`` gives, since a common shift leaves the argmax unchanged."""
        b = np.asarray(self.bias, np.float64)
        b = b - b.min() + bonus
        return {int(t): float(v) for t, v in zip(self.token_ids, b, strict=True)}

    def answer_to_label(self, answer: str) -> str | None:
        """The label a completion names (its first word matched against the label words), else None."""
        a = answer.strip().lower()
        first = a.split()[0].strip(".,;:!?\"'()") if a else ""
        if not first:
            return None
        words = [w.strip().lower() for w in self.label_words]
        exact = [i for i, w in enumerate(words) if first == w]
        if len(exact) == 1:
            return self.labels[exact[0]]
        prefix = [i for i, w in enumerate(words) if w.startswith(first)]  # a one-token answer: the word's first piece
        return self.labels[prefix[0]] if len(prefix) == 1 else None

    # ---- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        if not isinstance(d, dict) or d.get("version") != CALIB_VERSION:
            raise CalibrationError(f"unsupported calibration (version {d.get('version') if isinstance(d, dict) else None!r})")
        try:
            c = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise CalibrationError(f"malformed calibration: {e}") from None
        if not (len(c.labels) == len(c.label_words) == len(c.token_ids) == len(c.bias) >= 2):
            raise CalibrationError("malformed calibration: labels, label_words, token_ids and bias differ in length")
        return c

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic, durable JSON write (convert.atomic)."""
        path = Path(path)
        with atomic_open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        p = Path(path)
        if not p.is_file():
            raise CalibrationError(f"calibration file not found: {p}")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalibrationError(f"{p}: not a calibration JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except CalibrationError as e:
            raise CalibrationError(f"{p}: {e}") from None


def llama_kwargs() -> dict[str, Any]:
    """``llama_cpp.Llama(...)`` arguments that make serving compute what ``edgezo eval`` computes.

    eval's runtime leaves flash attention at llama.cpp's default (on, on CPU); ``Llama`` turns it off unless
    asked, which moves SmolLM2's label logits by up to ~0.3 and flips examples near the threshold. With it on,
    a single prompt gives eval's scores exactly at ``--batch-size 1``; larger eval batches still differ by
    llama.cpp's batch-dependent rounding (up to a few tenths of a logit on Q4_1)."""
    return {"flash_attn": True}


def serving_kwargs(calib: Calibration, use_bias: bool = True) -> dict[str, Any]:
    """``Llama.create_completion`` arguments that reproduce ``edgezo eval``'s calibrated prediction:
    one greedy token, with the calibrated ``logit_bias`` on the label words' first tokens."""
    # no repetition penalties: the prompt names the label words, a penalty would shift their logits
    kw: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
                          "frequency_penalty": 0.0, "presence_penalty": 0.0}
    if use_bias:
        kw["logit_bias"] = calib.logit_bias()
    return kw


def serve(llm, calib: Calibration, text: str, use_bias: bool = True) -> tuple[str, str | None]:
    """Greedy answer of a llama-cpp-python ``Llama`` (loaded with ``lora_path=`` the adapter) to ``text``:
    (answer text, label or None)."""
    out = llm.create_completion(calib.serve_prompt(text), **serving_kwargs(calib, use_bias))
    answer = out["choices"][0]["text"]
    return answer, calib.answer_to_label(answer)


def metrics_with_calibration(scores: np.ndarray, labels: np.ndarray, calib: Calibration | None) -> dict[str, Any]:
    """``classification_metrics`` with the best-threshold-on-this-set figure labelled as an oracle
    (``oracle_calibrated_accuracy``), and ``calibrated_accuracy`` from the SAVED calibration (None without)."""
    from edge.tasks import classification_metrics

    m: dict[str, Any] = dict(classification_metrics(scores, labels))
    m["oracle_calibrated_accuracy"] = m.pop("calibrated_accuracy")
    if calib is None:
        m["calibrated_accuracy"] = None
    else:
        pred = calib.predict(scores)
        m["calibrated_accuracy"] = float((pred == labels).mean()) if len(labels) else None
        m["calibrated_predicted_fraction"] = [float((pred == k).mean()) for k in range(scores.shape[1])]
    return m
