"""The cloud's full-precision twin of the edge model: the same base, the same AdapterSpec, in torch.

The LoRA is implemented by wrapping each target ``nn.Linear`` (y = W x + scale·B(A x)); every A/B is a
*view* of one flat parameter ``theta`` laid out in AdapterSpec order, so θ (numpy, wire) ↔ torch is a single
copy of one vector and can never scramble tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from protocol.spec import LORA_TARGETS, AdapterSpec, ModelDims


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(path: str | Path, *, device: str | None = None):
    """(model, tokenizer) in fp32 from an HF folder or a GGUF file (dequantized by transformers, offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():  # else transformers reads the path as a Hub repo id and says so, which misleads here
        raise FileNotFoundError(f"model {p} not found: give an HF model folder or a .gguf file (nothing is downloaded)")
    if p.is_file() and p.suffix == ".gguf":
        kw = {"gguf_file": p.name}
        src = p.parent
    else:
        kw, src = {}, p
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    model.to(pick_device(device)).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def model_dims(model) -> ModelDims:
    """The adapter-relevant sizes of an HF llama-family model."""
    c = model.config
    return ModelDims(
        n_layers=int(c.num_hidden_layers),
        hidden=int(c.hidden_size),
        intermediate=int(c.intermediate_size),
        n_heads=int(c.num_attention_heads),
        n_kv_heads=int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
        head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
    )


class LoRALinear(nn.Module):
    """y = W x + scale·B(A x), with A and B read as views of a shared flat θ (or a frozen A buffer)."""

    def __init__(self, *, base: nn.Linear, owner: LoRAModel, a_slot: tuple[int, tuple[int, int]] | None,
                 a_frozen: torch.Tensor | None, b_slot: tuple[int, tuple[int, int]], scale: float) -> None:
        super().__init__()
        self.base = base
        self._owner = [owner]  # a list, so the owner is not registered as a sub-module (no cycle)
        self.a_slot, self.b_slot, self.scale = a_slot, b_slot, scale
        if a_frozen is not None:
            self.register_buffer("a_frozen", a_frozen)
        else:
            self.a_frozen = None

    def _view(self, slot: tuple[int, tuple[int, int]]) -> torch.Tensor:
        off, shape = slot
        return self._owner[0].theta[off : off + shape[0] * shape[1]].view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a_frozen if self.a_slot is None else self._view(self.a_slot)
        b = self._view(self.b_slot)
        return self.base(x) + self.scale * ((x @ a.t()) @ b.t())


class LoRAModel:
    """A frozen base model plus the AdapterSpec's LoRA, all trainable scalars in ``self.theta`` (d,)."""

    def __init__(self, *, model, spec: AdapterSpec, init_seed: int = 0, theta: np.ndarray | None = None) -> None:
        if spec.kind != "lora":
            raise ValueError(f"LoRAModel needs a 'lora' spec, got {spec.kind!r}")
        if spec.dims != model_dims(model):
            raise ValueError(f"spec dims {spec.dims} do not match the model {model_dims(model)}")
        self.model, self.spec = model, spec
        self.device = next(model.parameters()).device
        init = spec.init(init_seed)
        self.frozen = {k: v for k, v in init.items() if not self._trainable(k)}
        th = spec.flatten(init) if theta is None else np.asarray(theta, np.float32)
        self.theta = nn.Parameter(torch.from_numpy(np.array(th, np.float32, copy=True)).to(self.device))
        layers = model.model.layers
        for info_a, info_b in _pairs(spec):
            mod_path = LORA_TARGETS[info_a.target][0]
            parent = layers[info_a.layer]
            *head, leaf = mod_path.split(".")
            for h in head:
                parent = getattr(parent, h)
            base = getattr(parent, leaf)
            if isinstance(base, LoRALinear):
                raise ValueError("model already carries a LoRA")
            a_slot = (info_a.offset, info_a.shape) if info_a.trainable else None
            a_frozen = None if info_a.trainable else torch.from_numpy(init[info_a.gguf_name]).to(self.device)
            wrapped = LoRALinear(base=base, owner=self, a_slot=a_slot, a_frozen=a_frozen,
                                 b_slot=(info_b.offset, info_b.shape), scale=spec.scale)
            setattr(parent, leaf, wrapped)

    def _trainable(self, name: str) -> bool:
        return any(t.gguf_name == name and t.trainable for t in self.spec.tensors)

    # ---- θ in and out ------------------------------------------------------------------------
    def get_theta(self) -> np.ndarray:
        return self.theta.detach().cpu().numpy().astype(np.float32, copy=True)

    def set_theta(self, theta: np.ndarray) -> None:
        th = np.asarray(theta, np.float32)
        if th.shape != (self.spec.d,):
            raise ValueError(f"θ has shape {th.shape}, spec expects ({self.spec.d},)")
        with torch.no_grad():
            self.theta.copy_(torch.from_numpy(np.ascontiguousarray(th)))


def _pairs(spec: AdapterSpec):
    """(A info, B info) per adapted module, in spec order."""
    ts = spec.tensors
    return [(ts[i], ts[i + 1]) for i in range(0, len(ts), 2)]


# ---- tasks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassificationTask:
    """Prompt template + label words; the loss is CE over the label words' logits at the last prompt token."""

    template: str = "Review: {text}\nSentiment (positive or negative):"  # edge.tasks.DEFAULT_TEMPLATE
    label_words: tuple[str, ...] = (" negative", " positive")  # index = class (0 rotten, 1 fresh)
    max_chars: int = 400

    def __post_init__(self) -> None:
        if len(self.label_words) < 2:
            raise ValueError("a classification task needs at least two label words")
        if "{text}" not in self.template:
            raise ValueError("template must contain {text}")

    def prompts(self, texts: Sequence[str]) -> list[str]:
        return [self.template.format(text=t[: self.max_chars]) for t in texts]

    def label_ids(self, tokenizer) -> list[int]:
        """First token of each label word (the word must be one token for the loss to be exact)."""
        return [int(tokenizer.encode(w, add_special_tokens=False)[0]) for w in self.label_words]


class TorchScorer:
    """Batched label-word logits / CE loss / accuracy of a LoRAModel on a ClassificationTask."""

    def __init__(self, *, lora: LoRAModel, tokenizer, task: ClassificationTask) -> None:
        self.lora, self.tok, self.task = lora, tokenizer, task
        self.label_ids = torch.tensor(task.label_ids(tokenizer), device=lora.device)
        self._cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def _encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(texts)
        if key not in self._cache:
            # the tokenizer's own special-token rule (SmolLM2: no BOS), as llama.cpp's add_bos on the edge
            enc = [self.tok.encode(p, add_special_tokens=True) for p in self.task.prompts(texts)]
            n = max(len(e) for e in enc)
            pad = self.tok.pad_token_id or 0
            ids = torch.full((len(enc), n), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), n), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, : len(e)] = torch.tensor(e)
                mask[i, : len(e)] = 1
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = (ids.to(self.lora.device), mask.to(self.lora.device))
        return self._cache[key]

    def label_logits(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, n_labels) logits of the label words at each prompt's last token (right padding).

        Runs the decoder body only, then the LM head's label rows at the last positions: the full
        (n, T, vocab) logits are never built.
        """
        ids, mask = self._encode(texts)
        hidden = self.lora.model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, T, h)
        last = mask.sum(1) - 1
        h = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # (n, h)
        head = self.lora.model.get_output_embeddings()
        logits = h @ head.weight[self.label_ids].t()
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self.label_ids]
        return logits

    def loss(self, texts: Sequence[str], labels: Sequence[int]) -> torch.Tensor:
        y = torch.as_tensor(list(labels), device=self.lora.device)
        return nn.functional.cross_entropy(self.label_logits(texts), y)

    def loss_value(self, theta: np.ndarray | None, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Forward-only loss at θ (or the current θ): what a ZO edge measures."""
        if theta is not None:
            self.lora.set_theta(theta)
        with torch.no_grad():
            return float(self.loss(texts, labels))

    def gradient(self, theta: np.ndarray, texts: Sequence[str], labels: Sequence[int]) -> tuple[np.ndarray, float]:
        """(∇_θ loss as float32 (d,), loss) at θ."""
        self.lora.set_theta(theta)
        self.lora.theta.grad = None
        with torch.enable_grad():
            loss = self.loss(texts, labels)
            loss.backward()
        g = self.lora.theta.grad.detach().cpu().numpy().astype(np.float32, copy=True)
        self.lora.theta.grad = None
        return g, float(loss.detach())

    def margins(self, texts: Sequence[str], batch: int = 32) -> np.ndarray:
        """logit(label 1) − logit(label 0) per text (binary tasks): accuracy and calibration read these."""
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                lg = self.label_logits(texts[i : i + batch])
                out.append((lg[:, 1] - lg[:, 0]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def accuracy(margins: np.ndarray, labels: Sequence[int], threshold: float = 0.0) -> float:
    y = np.asarray(labels)
    return float(np.mean((np.asarray(margins) > threshold).astype(int) == y)) if y.size else math.nan


def calibrate_threshold(margins: np.ndarray, labels: Sequence[int]) -> float:
    """The threshold on the margin that maximises accuracy on a validation split (midpoints searched)."""
    m = np.sort(np.asarray(margins, np.float64))
    if m.size == 0:
        return 0.0
    cands = np.concatenate([[m[0] - 1.0], (m[1:] + m[:-1]) / 2.0, [m[-1] + 1.0]])
    accs = [accuracy(margins, labels, float(c)) for c in cands]
    return float(cands[int(np.argmax(accs))])


# ---- wiring for the daemon -------------------------------------------------------------------------
def spec_for(model, *, rank: int, alpha: float, targets: Sequence[str], layers: Sequence[int], train: str) -> AdapterSpec:
    return AdapterSpec(kind="lora", dims=model_dims(model), rank=rank, alpha=alpha, targets=tuple(targets),
                       layers=tuple(layers), train=train)


def build_scorer(*, model_path: str, device: str, rank: int, alpha: float, targets: Sequence[str],
                 layers: Sequence[int], train: str, init_seed: int, task: ClassificationTask | None = None):
    """(spec, TorchScorer) for a base model: what every rank of a data-parallel guide builds alike."""
    model, tok = load_base(model_path, device=device or None)
    spec = spec_for(model, rank=rank, alpha=alpha, targets=targets, layers=layers, train=train)
    lora = LoRAModel(model=model, spec=spec, init_seed=init_seed)
    return spec, TorchScorer(lora=lora, tokenizer=tok, task=task or ClassificationTask())


def build_cloud(*, model_path: str, device: str, rank: int, alpha: float, targets: Sequence[str],
                layers: Sequence[int], train: str, init_seed: int, public, batch: int, guidance_config,
                rng: np.random.Generator, task: ClassificationTask | None = None, wrap=None):
    """(spec, θ0, GuidanceBuilder, scorer) for a base model and a public :class:`cloud.data.Slice`. ``wrap``
    (e.g. :class:`cloud.distributed.LeaderScorer`) wraps the scorer before anything uses its gradient."""
    from cloud.guidance import GuidanceBuilder

    spec, scorer = build_scorer(model_path=model_path, device=device, rank=rank, alpha=alpha, targets=targets,
                                layers=layers, train=train, init_seed=init_seed, task=task)
    theta0 = scorer.lora.get_theta()
    if wrap is not None:
        scorer = wrap(scorer)
    batches = public.batches(batch)
    builder = GuidanceBuilder(grad_fn=lambda th, b: scorer.gradient(th, *batches[b]), config=guidance_config,
                              rng=rng, n_batches=len(batches))
    return spec, theta0, builder, scorer
