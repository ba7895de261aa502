"""FedSPZO activation reuse in llama.cpp: capture the residual stream after layer s-1, run layers >= s from it.

A model split at layer s has two parts:
  head: layers 0..s-1 of the base model. A *capture* pass decodes the mini-batch on a context whose eval callback
        copies ``l_out-{s-1}`` (every token, (n_tokens, n_embd) float32) and then returns False, which makes
        ggml's scheduler stop computing the graph: layers >= s and the output head never run.
  tail: a GGUF of layers s..L-1 (``convert.tail``, made once and cached per base-model digest), fed the captured
        states through ``llama_batch.embd`` with the original positions and sequence ids. Its LoRA adapter holds
        the base adapter's layers >= s renamed ``blk.{l-s}``, written in place like the base one.

θ is layer-major (protocol/spec.py), so θ[split:] (split = spec.layer_offset(s)) is exactly the tail adapter's θ.
The capture runs on the base runtime's own context (its adapter: layers < s matter, the rest is never reached),
through ``Runtime.eval_hook``, so the split adds the tail's weights and one context, not a second base context. Control vectors are
per-context and layer-indexed; the split supports LoRA adapters only and says so.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edge.adapter import GGMLTensor, LoraAdapter
from edge.models import cache_dir, file_digest
from edge.runtime import Runtime, RuntimeErrorEZ
from edge.tasks import Encoded
from protocol.spec import AdapterSpec, ModelDims

GGML_TYPE_F32 = 0


def tail_model(base: str | os.PathLike, start: int, folder: Path | None = None) -> Path:
    """The tail GGUF of ``base`` from layer ``start``: made by ``convert.tail`` on first use, then reused.

    The name carries the base's content digest; a different or modified base model never reuses a stale tail.
    """
    from convert.errors import ConvertError
    from convert.tail import write_tail_gguf

    folder = folder or cache_dir() / "tail"
    path = folder / f"{file_digest(base)[:20]}-from{start}.gguf"
    if not path.is_file():
        try:
            write_tail_gguf(Path(base), path, start)
        except (ConvertError, OSError) as e:
            raise RuntimeErrorEZ(f"could not make the tail model of {base} from layer {start}: {e}") from e
    return path


def tail_spec(spec: AdapterSpec, start: int) -> AdapterSpec:
    """The adapter spec of the tail model: layers >= start, renumbered from 0 (same θ order as spec's tail)."""
    d = spec.dims
    dims = ModelDims(n_layers=d.n_layers - start, hidden=d.hidden, intermediate=d.intermediate,
                     n_heads=d.n_heads, n_kv_heads=d.n_kv_heads, head_dim=d.head_dim)
    layers = tuple(i - start for i in spec.layers if i >= start)
    if not layers:
        raise ValueError(f"the adapter has no layer >= {start}: nothing for the tail to train")
    return AdapterSpec(spec.kind, dims, rank=spec.rank, alpha=spec.alpha, targets=spec.targets, layers=layers,
                       train=spec.train)


def rename_to_tail(tensors: Mapping[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
    """Adapter tensors of layers >= start under the tail's names (``blk.{l}`` → ``blk.{l-start}``)."""
    from convert.tail import tail_tensor_name

    out = {}
    for name, arr in tensors.items():
        new = tail_tensor_name(name, start)
        if new is not None:
            out[new] = arr
    return out


class SplitRunner:
    """Capture passes on the base model and tail passes on the tail model, for one adapter split at ``start``.

    ``capture(batch)`` → per-example states (n_tokens_i, n_embd) after layer start-1, with the base adapter's
    current values; ``tail_scores(task, batch, states)`` → what ``task`` needs from the tail's logits.
    ``passes`` reads the runtimes' own decode counters: full forwards, captures, tail passes.
    """

    def __init__(self, rt: Runtime, base_adapter: LoraAdapter, start: int, tensors: Mapping[str, np.ndarray],
                 folder: Path | None = None) -> None:
        if not isinstance(base_adapter, LoraAdapter):
            raise ValueError("the split (activation reuse) supports LoRA adapters only, not control vectors")
        if not 0 < start < rt.n_layer:
            raise ValueError(f"split layer must be in 1..{rt.n_layer - 1} for this {rt.n_layer}-layer model, got {start}")
        self.rt, self.start = rt, start
        self.spec = tail_spec(base_adapter.spec, start)
        self.split = base_adapter.spec.layer_offset(start)  # θ[split:] is the tail's θ
        self.tail = Runtime(tail_model(rt.path, start, folder), rt.config)
        self.tail_adapter = LoraAdapter(self.tail, self.spec, rename_to_tail(tensors, start))
        self._target = f"l_out-{start - 1}".encode()
        self._grab: np.ndarray | None = None

    @property
    def passes(self) -> dict[str, int]:
        """Decodes run so far, counted by the runtimes: "forward" (full), "capture" (head), "tail"."""
        return {"forward": self.rt.passes["forward"], "capture": self.rt.passes["capture"],
                "tail": self.tail.passes["embd"]}

    def _on_eval(self, t: int, ask: bool) -> bool:  # pragma: no cover - called from C via Runtime.eval_hook
        node = GGMLTensor.from_address(t)
        if node.name != self._target:
            return False if ask else True
        if ask:
            return True
        ne0, ne1 = int(node.ne[0]), int(node.ne[1])
        if node.type != GGML_TYPE_F32 or int(node.nb[1]) != 4 * ne0:
            self._grab = None
            return False
        buf = (ctypes.c_float * (ne0 * ne1)).from_address(node.data)
        self._grab = np.ctypeslib.as_array(buf).reshape(ne1, ne0).copy()  # (n_tokens, n_embd)
        return False  # stop here: the rest of the graph (layers >= start, the head) is not computed

    def capture(self, batch: Sequence[Encoded]) -> list[np.ndarray]:
        """States after layer start-1 for every token of every example: [(n_tokens_i, n_embd)]."""
        seqs = [e.tokens for e in batch]
        out: list[np.ndarray] = []
        for i, j in self.rt.chunks([len(s) for s in seqs]):
            b = self.rt._batch
            k = 0
            for toks in seqs[i:j]:
                for t in toks:
                    b.token[k] = t
                    k += 1
            self._grab = None
            self.rt.eval_hook = self._on_eval
            try:
                self.rt._decode_batch(b, [range(len(s)) for s in seqs[i:j]], [() for _ in seqs[i:j]], [0], self.rt.ctx,
                                      "capture")
            finally:
                self.rt.eval_hook = None
            if self._grab is None or self._grab.shape != (k, self.rt.n_embd):
                raise RuntimeErrorEZ(f"could not capture {self._target.decode()} (got {None if self._grab is None else self._grab.shape})")
            off = 0
            for toks in seqs[i:j]:
                out.append(self._grab[off : off + len(toks)])
                off += len(toks)
        return out

    def write_tail(self, theta_tail: np.ndarray) -> None:
        """Write θ[split:] (the tail's θ) into the tail adapter."""
        self.tail_adapter.write(theta_tail)

    def tail_logits(self, batch: Sequence[Encoded], states: Sequence[np.ndarray], cols: Sequence[int] | None) -> np.ndarray:
        """Tail logits at each example's wanted positions from captured states, as ``Runtime.logits`` gives."""
        return self.tail.logits_embd(states, [e.want for e in batch], cols)

    def close(self) -> None:
        self.tail_adapter.close()
        self.tail.close()
