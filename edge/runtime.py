"""llama.cpp runtime for the edge: load a GGUF safely, tokenize, and evaluate many sequences in one batch.

Low-level llama-cpp-python API only (no ``llama_cpp.Llama``): one model, one context, one reusable batch.
A loss evaluation packs every example of a mini-batch into ONE ``llama_decode`` call, each example its own
``seq_id``, variable lengths, no padding, logits requested only at the target positions, and the KV cache
cleared before every pass (DESIGN.md, "Zeroth-order step").
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from convert.llamacpp import needs_amx_guard, safe_model_params  # noqa: F401 - re-exported

GGUF_MAGIC = b"GGUF"


class RuntimeErrorEZ(RuntimeError):
    """A model or adapter could not be loaded or evaluated; the message names the problem."""


# ---- AMX guard: convert.llamacpp (shared with convert's evaluator), re-exported here -----------------------
# ---- logging -----------------------------------------------------------------------------------------
@llama_cpp.llama_log_callback
def _silent_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:  # pragma: no cover - C callback
    if level == 4 and os.environ.get("EDGEZO_LLAMA_LOG"):  # GGML_LOG_LEVEL_ERROR
        print(text.decode(errors="replace"), end="")


def quiet_llama() -> None:
    """Silence llama.cpp's stderr chatter (set EDGEZO_LLAMA_LOG=1 to see errors)."""
    llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))


def check_gguf(path: str | os.PathLike, what: str = "model") -> Path:
    """The path, after checking the file exists and starts with the GGUF magic; a clear error otherwise."""
    p = Path(path)
    if not p.is_file():
        raise RuntimeErrorEZ(f"{what} file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RuntimeErrorEZ(f"{what} file {p} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    return p


MADV_DONTNEED = 4  # linux/mman.h


def drop_file_pages(path: str | os.PathLike) -> int:
    """Drop this process's resident pages of the read-only mappings of ``path``; bytes advised (0 if none).

    llama.cpp mmaps the GGUF and, on CPUs with repacked kernels (REPACK in the system info), copies most weights
    into repacked buffers at load: the mapped file pages it read stay resident, a second copy of the weights
    (SmolLM2 Q4_0: +56 MB). MADV_DONTNEED on a read-only shared file mapping only unmaps them; the tensors still
    read from the mapping (token embeddings, norms) fault back in from the page cache, unchanged.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # not Linux / no libc symbol: nothing to do
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target = os.path.realpath(path)
    done = 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read().splitlines()
    except OSError:
        return 0
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target and parts[1].startswith("r-") and "w" not in parts[1]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if madvise(lo, hi - lo, MADV_DONTNEED) == 0:
                done += hi - lo
    return done


def default_threads() -> int:
    """Cores this process may run on (os.cpu_count() can report the host's, not the container's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RuntimeConfig:
    """Context settings. ``exact`` = F32 KV cache and flash attention off (for comparisons with torch)."""

    n_ctx: int = 2048  # KV cells shared by all sequences of one pass (kv_unified)
    n_seq_max: int = 64
    n_threads: int = 0  # 0: os.cpu_count()
    exact: bool = False


class Runtime:
    """One GGUF model and one context. ``logits(seqs, want)`` runs one multi-sequence pass."""

    def __init__(self, model_path: str | os.PathLike, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.path = check_gguf(model_path)
        quiet_llama()
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), safe_model_params())
        if not self.model:
            raise RuntimeErrorEZ(f"llama.cpp could not load model {self.path} (corrupt or unsupported GGUF)")
        drop_file_pages(self.path)  # weights copied into repacked buffers need not stay resident twice
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        self.arch = self.meta("general.architecture") or ""
        # The main context always has an eval callback, so a capture (edge/split.py) can read a layer's output
        # and stop the graph there on this very context (a second context would cost its own KV cache).
        # With no hook set it answers "not needed" for every node: the graph runs as one piece, as without one.
        self.eval_hook = None
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)  # keep a reference: C holds it
        self.ctx = self.new_context(self._cb)
        self._batch = llama_cpp.llama_batch_init(self.config.n_ctx, 0, 1)
        self._embd_batch = None  # a batch of hidden states (llama_batch.embd), made on first use
        self.passes: Counter[str] = Counter()  # llama_decode calls by kind: "forward" (tokens), "embd" (states)
        self._closed = False

    def _on_eval(self, t: int, ask: bool, user_data: int) -> bool:  # pragma: no cover - called from C
        hook = self.eval_hook
        return False if hook is None else hook(t, ask)

    # ---- model facts ------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def dims(self):  # -> protocol.spec.ModelDims
        """The base model's sizes from GGUF metadata (what AdapterSpec needs)."""
        from protocol.spec import ModelDims

        a = self.arch

        def num(key: str) -> int:
            v = self.meta(f"{a}.{key}")
            if v is None:
                raise RuntimeErrorEZ(f"model {self.path} has no {a}.{key} metadata")
            return int(v)

        n_head = num("attention.head_count")
        head_dim = self.meta(f"{a}.attention.key_length")
        return ModelDims(
            n_layers=self.n_layer,
            hidden=self.n_embd,
            intermediate=num("feed_forward_length"),
            n_heads=n_head,
            n_kv_heads=int(self.meta(f"{a}.attention.head_count_kv") or n_head),
            head_dim=int(head_dim) if head_dim else None,
        )

    # ---- contexts ---------------------------------------------------------------------------------
    def context_params(self, cb_eval=None) -> llama_cpp.llama_context_params:
        c = self.config
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = c.n_ctx
        p.n_batch = c.n_ctx  # the whole multi-sequence batch is one ubatch
        p.n_ubatch = c.n_ctx
        p.n_seq_max = c.n_seq_max
        p.kv_unified = True  # sequences of different lengths share one cache
        threads = c.n_threads or default_threads()
        p.n_threads = p.n_threads_batch = threads
        p.no_perf = True
        if c.exact:
            p.type_k = p.type_v = llama_cpp.GGML_TYPE_F32
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if cb_eval is not None:
            p.cb_eval = cb_eval
            p.cb_eval_user_data = None
        return p

    def new_context(self, cb_eval=None):
        ctx = llama_cpp.llama_init_from_model(self.model, self.context_params(cb_eval))
        if not ctx:
            raise RuntimeErrorEZ(f"llama.cpp could not create a context for {self.path}")
        return ctx

    def fit_context(self, lengths: Sequence[int], batch: int, floor: int = 256) -> int:
        """Resize the context to the smallest power of two (≥ ``floor``) holding the ``batch`` longest sequences
        in one decode, so the KV cache (SmolLM2: 23 KB per cell, zeroed at creation, so resident) is no bigger
        than the data needs. Call before adapters attach to the context; returns the new n_ctx."""
        need = sum(sorted(lengths, reverse=True)[:batch]) if lengths else floor
        n_ctx = max(floor, 1 << max(0, int(need - 1).bit_length()))
        if n_ctx != self.config.n_ctx:
            from dataclasses import replace

            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_batch_free(self._batch)
            if self._embd_batch is not None:
                llama_cpp.llama_batch_free(self._embd_batch)
                self._embd_batch = None
            self.config = replace(self.config, n_ctx=n_ctx, n_seq_max=max(self.config.n_seq_max, 1))
            self.ctx = self.new_context(self._cb)
            self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        return n_ctx

    # ---- tokens -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        n_max = len(raw) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_bos, False)
        if n < 0:
            raise RuntimeErrorEZ(f"tokenization failed for {text[:40]!r}")
        return list(buf[:n])

    def bos(self) -> list[int]:
        """[bos] when the model wants one, else []."""
        if llama_cpp.llama_vocab_get_add_bos(self.vocab):
            return [int(llama_cpp.llama_vocab_bos(self.vocab))]
        return []

    # ---- evaluation -------------------------------------------------------------------------------
    def logits(
        self,
        seqs: Sequence[Sequence[int]],
        want: Sequence[Sequence[int]],
        cols: Sequence[int] | None = None,
        ctx=None,
        kind: str = "forward",
    ) -> np.ndarray:
        """Logits (n_out, n_vocab or len(cols)) float32 at positions ``want[i]`` of ``seqs[i]``, in order.

        All sequences go into one decode (split into several only when they exceed n_ctx / n_seq_max).
        ``kind`` names the decodes in :attr:`passes`.
        """
        ctx = ctx or self.ctx
        out = [self._decode(seqs[i:j], want[i:j], cols, ctx, kind) for i, j in self.chunks([len(x) for x in seqs])]
        width = self.n_vocab if cols is None else len(cols)
        return np.concatenate(out, axis=0) if out else np.zeros((0, width), np.float32)

    def chunks(self, lengths: Sequence[int]) -> Iterator[tuple[int, int]]:
        """Ranges [i, j) of sequences that fit one decode (n_ctx tokens, n_seq_max sequences)."""
        i, n = 0, len(lengths)
        while i < n:
            j, tot = i, 0
            while j < n and j - i < self.config.n_seq_max and tot + lengths[j] <= self.config.n_ctx:
                tot += lengths[j]
                j += 1
            if j == i:
                raise RuntimeErrorEZ(f"sequence of {lengths[i]} tokens exceeds n_ctx={self.config.n_ctx}")
            yield i, j
            i = j

    def logits_embd(
        self,
        states: Sequence[np.ndarray],
        want: Sequence[Sequence[int]],
        cols: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Like :meth:`logits`, but each sequence is given as hidden states (n_tokens_i, n_embd) float32 fed
        through ``llama_batch.embd`` at positions 0..n_tokens_i-1 (a tail model's input, edge/split.py)."""
        for h in states:
            if h.ndim != 2 or h.shape[1] != self.n_embd:
                raise RuntimeErrorEZ(f"hidden states of shape {h.shape} do not fit n_embd={self.n_embd}")
        if self._embd_batch is None:
            self._embd_batch = llama_cpp.llama_batch_init(self.config.n_ctx, self.n_embd, 1)
        out = []
        for i, j in self.chunks([len(h) for h in states]):
            b = self._embd_batch
            embd = np.ctypeslib.as_array(b.embd, shape=(self.config.n_ctx, self.n_embd))
            flat = np.concatenate(states[i:j], axis=0)  # (n_tokens, n_embd)
            embd[: len(flat)] = flat
            out.append(self._decode_batch(b, [range(len(h)) for h in states[i:j]], want[i:j], cols, self.ctx, "embd"))
        width = self.n_vocab if cols is None else len(cols)
        return np.concatenate(out, axis=0) if out else np.zeros((0, width), np.float32)

    def _decode(self, seqs, want, cols, ctx, kind: str) -> np.ndarray:
        b = self._batch
        k = 0
        for toks in seqs:
            for t in toks:
                b.token[k] = t
                k += 1
        return self._decode_batch(b, [range(len(t)) for t in seqs], want, cols, ctx, kind)

    def _decode_batch(self, b, positions, want, cols, ctx, kind: str) -> np.ndarray:
        """Fill positions/sequence ids/output flags of ``b`` (tokens or embd already set), clear the KV cache,
        decode once; the logits at the wanted positions."""
        k = 0
        n_out = 0
        for s, (pos, pos_want) in enumerate(zip(positions, want, strict=True)):
            wanted = set(pos_want)
            for p in pos:
                b.pos[k] = p
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = s
                w = p in wanted
                b.logits[k] = w
                n_out += w
                k += 1
        b.n_tokens = k
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), False)
        rc = llama_cpp.llama_decode(ctx, b)
        self.passes[kind] += 1
        if rc != 0:
            raise RuntimeErrorEZ(f"llama_decode failed with code {rc}")
        if n_out == 0:
            return np.zeros((0, self.n_vocab if cols is None else len(cols)), np.float32)
        ptr = llama_cpp.llama_get_logits(ctx)
        arr = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))  # a view into llama.cpp's buffer
        if cols is not None:
            return arr[:, list(cols)].astype(np.float32)  # (n_out, len(cols))
        return np.array(arr, dtype=np.float32, copy=True)  # (n_out, n_vocab)

    def close(self) -> None:
        """Free the batch, context and model (adapters must be freed by their owner first)."""
        if self._closed:
            return
        self._closed = True
        llama_cpp.llama_batch_free(self._batch)
        if self._embd_batch is not None:
            llama_cpp.llama_batch_free(self._embd_batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def selfcheck(model_path: str | os.PathLike) -> None:
    """Load a model and decode two sequences; raises on failure. ``python -m edge.runtime MODEL.gguf`` runs it
    in a fresh process, so a crash inside llama.cpp (e.g. the AMX segfault) cannot take the caller down."""
    with Runtime(model_path, RuntimeConfig(n_ctx=128, n_seq_max=2, n_threads=1)) as rt:
        toks = rt.bos() + rt.tokenize("Review: fine\nSentiment:")
        out = rt.logits([toks, toks[:3]], [[len(toks) - 1], [2]])
        if out.shape != (2, rt.n_vocab) or not np.isfinite(out).all():
            raise RuntimeErrorEZ(f"selfcheck of {model_path}: bad logits {out.shape}")


if __name__ == "__main__":
    import sys

    selfcheck(sys.argv[1])
    print("OK")
