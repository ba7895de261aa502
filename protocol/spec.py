"""Adapter parameter space: the one order of every trainable scalar, shared by edge and cloud.

Flatten order (DESIGN.md): layer ascending, then ``targets`` in the spec's order, then A before B,
each tensor row-major in its torch shape (A: ``[r, in]``, B: ``[out, r]``, as PEFT's ``lora_A`` /
``lora_B``; llama.cpp's ``.lora_a`` / ``.lora_b`` use the same layout). A control vector has one
tensor per layer, ``[hidden]``, added to the layer's output (llama.cpp ``direction.{bid}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# target -> (HF module path inside a decoder layer, GGUF tensor stem, (out, in) from model dims).
# A table, like gguf-py's tensor maps: add a row to support another projection.
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn.q_proj", "attn_q"),
    "k_proj": ("self_attn.k_proj", "attn_k"),
    "v_proj": ("self_attn.v_proj", "attn_v"),
    "o_proj": ("self_attn.o_proj", "attn_output"),
    "gate_proj": ("mlp.gate_proj", "ffn_gate"),
    "up_proj": ("mlp.up_proj", "ffn_up"),
    "down_proj": ("mlp.down_proj", "ffn_down"),
}
CONTROL_TARGET = "l_out"

GGUF_LORA_NAME = "blk.{bid}.{stem}.weight.lora_{part}"  # part: a | b
PEFT_LORA_NAME = "base_model.model.model.layers.{bid}.{module}.lora_{part}.weight"  # part: A | B
GGUF_CONTROL_NAME = "direction.{bid}"

KINDS = ("lora", "control")
TRAIN_MODES = ("AB", "B")


@dataclass(frozen=True)
class ModelDims:
    """The few base-model sizes an adapter's shapes depend on."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden", "intermediate", "n_heads", "n_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelDims.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden % self.n_heads:
                raise ValueError(f"hidden {self.hidden} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)

    def io(self, target: str) -> tuple[int, int]:
        """(out_features, in_features) of a target projection."""
        h, i, hd = self.hidden, self.intermediate, int(self.head_dim or 0)
        table = {
            "q_proj": (self.n_heads * hd, h),
            "k_proj": (self.n_kv_heads * hd, h),
            "v_proj": (self.n_kv_heads * hd, h),
            "o_proj": (h, self.n_heads * hd),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }
        if target not in table:
            raise ValueError(f"unknown LoRA target {target!r}; known: {sorted(table)}")
        return table[target]

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One adapter tensor: where it lives in θ (if trainable) and what it is called on each side."""

    layer: int
    target: str
    part: str  # "A", "B" (LoRA) or "v" (control vector)
    shape: tuple[int, ...]
    trainable: bool
    offset: int  # start in θ; -1 when frozen

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def gguf_name(self) -> str:
        if self.part == "v":
            return GGUF_CONTROL_NAME.format(bid=self.layer)
        return GGUF_LORA_NAME.format(bid=self.layer, stem=LORA_TARGETS[self.target][1], part=self.part.lower())

    @property
    def peft_name(self) -> str:
        if self.part == "v":
            return f"control.layers.{self.layer}.direction"
        return PEFT_LORA_NAME.format(bid=self.layer, module=LORA_TARGETS[self.target][0], part=self.part)


@dataclass(frozen=True)
class AdapterSpec:
    """Fixes the adapter's tensors and the order of every trainable scalar in θ.

    kind: "lora" or "control"; rank/alpha: LoRA rank and alpha (scale = alpha / rank, as PEFT);
    targets: LoRA projections (keys of LORA_TARGETS); layers: adapted layer indices;
    train: "AB" trains both factors, "B" only B (LoRA-FA: A stays at its seeded init).
    """

    kind: str
    dims: ModelDims
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] = ()
    train: str = "AB"
    tensors: tuple[TensorInfo, ...] = field(init=False, repr=False, compare=False)
    d: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AdapterSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"AdapterSpec.train must be one of {TRAIN_MODES}, got {self.train!r}")
        layers = tuple(sorted(set(self.layers))) if self.layers else tuple(range(self.dims.n_layers))
        bad = [i for i in layers if not 0 <= i < self.dims.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {self.dims.n_layers}-layer model")
        object.__setattr__(self, "layers", layers)
        if self.kind == "control":
            object.__setattr__(self, "targets", (CONTROL_TARGET,))
        else:
            if self.rank <= 0:
                raise ValueError(f"rank must be positive, got {self.rank}")
            if not self.targets or len(set(self.targets)) != len(self.targets):
                raise ValueError(f"targets must be non-empty and unique, got {self.targets}")
            for t in self.targets:
                if t not in LORA_TARGETS:
                    raise ValueError(f"unknown LoRA target {t!r}; known: {list(LORA_TARGETS)}")
            object.__setattr__(self, "targets", tuple(self.targets))
        infos: list[TensorInfo] = []
        off = 0
        for bid in layers:
            for t in self.targets:
                for part, shape in self._parts(t):
                    trainable = part != "A" or self.train == "AB"
                    infos.append(TensorInfo(bid, t, part, shape, trainable, off if trainable else -1))
                    if trainable:
                        off += math.prod(shape)
        object.__setattr__(self, "tensors", tuple(infos))
        object.__setattr__(self, "d", off)

    def _parts(self, target: str) -> list[tuple[str, tuple[int, ...]]]:
        if self.kind == "control":
            return [("v", (self.dims.hidden,))]
        out, inp = self.dims.io(target)
        return [("A", (self.rank, inp)), ("B", (out, self.rank))]

    @property
    def scale(self) -> float:
        """LoRA scaling applied to B @ A (PEFT's alpha / r); 1 for control vectors."""
        return self.alpha / self.rank if self.kind == "lora" else 1.0

    def layer_offset(self, layer: int) -> int:
        """Start in θ of the first trainable tensor of ``layer`` or later (d if none): block splits."""
        for info in self.tensors:
            if info.trainable and info.layer >= layer:
                return info.offset
        return self.d

    # ---- tensors <-> θ -------------------------------------------------------------------------
    def init(self, seed: int) -> dict[str, np.ndarray]:
        """Fresh adapter tensors keyed by GGUF name: A ~ Kaiming-uniform (PEFT's bound 1/sqrt(in)), B = 0.

        The initial adapter is a no-op. Deterministic in ``seed`` on every machine.
        """
        rng = np.random.Generator(np.random.PCG64(seed))
        out: dict[str, np.ndarray] = {}
        for info in self.tensors:
            if info.part == "A":
                bound = 1.0 / math.sqrt(info.shape[1])
                out[info.gguf_name] = rng.uniform(-bound, bound, size=info.shape).astype(np.float32)
            else:
                out[info.gguf_name] = np.zeros(info.shape, np.float32)
        return out

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """θ (float32, length d) from tensors keyed by GGUF name (frozen ones are ignored)."""
        theta = np.empty(self.d, np.float32)
        for info in self.tensors:
            if not info.trainable:
                continue
            if info.gguf_name not in tensors:
                raise KeyError(f"adapter tensor {info.gguf_name} missing")
            arr = np.asarray(tensors[info.gguf_name])
            if tuple(arr.shape) != info.shape:
                raise ValueError(f"{info.gguf_name}: shape {tuple(arr.shape)} != expected {info.shape}")
            theta[info.offset : info.offset + info.size] = arr.reshape(-1)
        return theta

    def unflatten(self, theta: np.ndarray, frozen: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Tensors keyed by GGUF name; trainable ones are views into ``theta``, frozen ones come from ``frozen``."""
        theta = np.asarray(theta)
        if theta.shape != (self.d,):
            raise ValueError(f"θ has shape {theta.shape}, spec expects ({self.d},)")
        out: dict[str, np.ndarray] = {}
        for info in self.tensors:
            if info.trainable:
                out[info.gguf_name] = theta[info.offset : info.offset + info.size].reshape(info.shape)
            else:
                if frozen is None or info.gguf_name not in frozen:
                    raise KeyError(f"frozen tensor {info.gguf_name} needed (train={self.train!r})")
                out[info.gguf_name] = np.asarray(frozen[info.gguf_name], np.float32).reshape(info.shape)
        return out

    # ---- serialisation (wire, checkpoints, GGUF metadata) ---------------------------------------
    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "dims": self.dims.to_dict(),
            "rank": self.rank,
            "alpha": float(self.alpha),
            "targets": list(self.targets),
            "layers": list(self.layers),
            "train": self.train,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> AdapterSpec:
        try:
            return cls(
                kind=str(d["kind"]),
                dims=ModelDims(**{k: int(v) for k, v in dict(d["dims"]).items()}),
                rank=int(d["rank"]),
                alpha=float(d["alpha"]),
                targets=tuple(str(t) for t in d["targets"]),
                layers=tuple(int(i) for i in d["layers"]),
                train=str(d["train"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed adapter spec: {e}") from e
