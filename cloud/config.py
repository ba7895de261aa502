"""Guide configuration: dataclasses validated in ``__post_init__``, loaded from TOML (tomllib), flags on top.

Example ``guide.toml``::

    [server]
    host = "127.0.0.1"
    port = 7878
    state_dir = "guide-state"

    [clients.tokens]
    edge-1 = "a-long-random-secret"

    [rounds]
    rounds = 20
    min_clients = 2
    max_clients = 8
    deadline_s = 300

    [train]
    kind = "subspace"      # the edge searches θ = θ_t + U·c (round v2); "guided" = Guided-ES + λ·g_B
    k = 16
    local_steps = 25

    [cloud]
    warm_steps = 40        # the cloud leads: AdamW on public data before round 0

    [model]
    path = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.constants import SPLIT_P1, SPLIT_P2
from protocol.zo import Lambda, check_lambda

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7878
    state_dir: str = "guide-state"
    log_file: str = ""  # "" → JSON lines on stderr
    max_frame_mb: float = 64.0
    io_timeout_s: float = 60.0  # per-frame read/write timeout once a message has started / idle limit
    long_poll_s: float = 20.0  # a join waits this long for a round before "wait, retry"
    max_errors: int = 5  # malformed messages tolerated per connection before it is dropped
    public_status: bool = False  # True: answer "status" without a token (counts only, no client ids)
    tls_cert: str = ""  # PEM certificate chain; with tls_key the guide speaks TLS (`edgezo guide cert` makes a pair)
    tls_key: str = ""
    insecure: bool = False  # plaintext TCP, only when asked for explicitly (logged as a warning)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_frame_mb <= 0 or self.io_timeout_s <= 0 or self.long_poll_s <= 0:
            raise ValueError("max_frame_mb, io_timeout_s and long_poll_s must be positive")
        if self.max_errors < 1:
            raise ValueError("max_errors must be >= 1")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("[server] tls_cert and tls_key go together")
        if self.insecure and self.tls_cert:
            raise ValueError("[server] insecure = true and tls_cert/tls_key contradict each other: pick one")

    def ssl_context(self):
        """The server's TLS context, or None for an explicitly insecure guide; a clear error when neither is set
        or a file is missing/unreadable."""
        if self.insecure:
            return None
        if not self.tls_cert:
            raise ValueError("[server] needs tls_cert and tls_key (make a pair with `edgezo guide cert`), or "
                             "insecure = true for plaintext")
        import ssl

        from protocol.auth import server_ssl_context

        try:
            return server_ssl_context(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"[server] TLS pair {self.tls_cert} / {self.tls_key} cannot be loaded: {e}") from e

    @property
    def max_frame(self) -> int:
        return int(self.max_frame_mb * (1 << 20))


@dataclass(frozen=True)
class RoundConfig:
    rounds: int = 10  # 0: run until stopped
    min_clients: int = 1
    max_clients: int = 10
    deadline_s: float = 120.0
    join_window_s: float = 0.5  # after min_clients are waiting, wait this long for more (up to max_clients)
    sample_seed: int = 0
    max_examples: int = 0  # cap on the example count an upload is weighted by (0: local_steps × batch)

    def __post_init__(self) -> None:
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not 1 <= self.min_clients <= self.max_clients:
            raise ValueError(f"need 1 <= min_clients <= max_clients, got {self.min_clients}, {self.max_clients}")
        if self.deadline_s <= 0 or self.join_window_s < 0:
            raise ValueError("deadline_s must be positive and join_window_s >= 0")


# The learning rate and ε of each guidance kind, defined once. "subspace": Adam over c ∈ R^k, ε on c
# (‖ε·U·u‖ ≈ ε√k: 0.1 at k = 16 is a radius of 0.4, the order of MeZO's at ε = 1e-3; research/guidance.md).
# "guided": Guided-ES + rectification over all of θ (the first round design; docs/RESULTS_rerun.md).
KIND_DEFAULTS: dict[str, dict[str, float]] = {
    "subspace": {"lr": 0.05, "eps": 0.1},
    "guided": {"lr": 0.03, "eps": 1e-3},
}


# The full-space MeZO rounds after [train] subspace_rounds: the warm-start MeZO lr picked on private validation
# (bench/convergence.py, arm b) and MeZO's ε on these quantized losses (bench/zo_linearity.py).
MEZO_DEFAULTS: dict[str, float] = {"mezo_lr": 1e-4, "mezo_eps": 1e-2}

GUIDED_ONLY = frozenset({"lam", "mix_alpha", "guide_batches", "precondition"})  # [train] keys of kind "guided" only

# Keys renamed so that a name says which α it is; an old key is refused with the new name, never read silently.
RENAMED_KEYS: dict[tuple[str, str], str] = {
    ("train", "alpha"): "[train] alpha was renamed mix_alpha (the Guided-ES mix; the LoRA scale is [model] lora_alpha)",
    ("model", "alpha"): "[model] alpha was renamed lora_alpha (the LoRA scale = lora_alpha / rank; the Guided-ES "
                        "mix is [train] mix_alpha)",
}


@dataclass(frozen=True)
class TrainConfig:
    """What the edges are told: guidance kind, local steps, schedule, perturbations per step q, batch, λ, k.

    ``kind`` "subspace" (round v2, default): the edge runs SPSA on c with θ = θ_t + U·c, U the cloud's
    k-dimensional basis. "guided": Guided-ES directions (``mix_alpha``, k) rectified by the cloud gradient (λ).
    ``lr``/``eps`` left unset take :data:`KIND_DEFAULTS` of the kind. ``edge_weight``: the merge's weight on the
    edges' averaged progress (cloud.engine.merge).
    """

    kind: str = "subspace"
    local_steps: int = 5
    lr: float | None = None
    eps: float | None = None
    momentum: float = 0.0
    decay: str = "constant"
    lam: Lambda = 0.5  # guided only: a fixed λ in [0, 1], or "online" (LAMBDA_ONLINE; protocol.zo.Lambda)
    q: int = 2
    batch: int = 8
    mix_alpha: float = 0.5  # guided only: Guided-ES mix, the weight of isotropic noise (1 = plain MeZO); Guide.alpha
    k: int = 16  # basis size: subspace 4-128; guided: last k cloud gradients
    guide_batches: int = 2  # guided only: public mini-batches per round
    precondition: str = "none"  # guided only: "adam" preconditions the public gradients (cloud.guidance)
    guided: bool = True  # False: no guidance at all (plain federated MeZO)
    edge_weight: float = 1.0
    split_layer: int = -1  # FedSPZO split at this layer (-1: none); all adapter layers >= it: frozen bottom
    # subspace only: rounds >= subspace_rounds run full-space federated MeZO at mezo_lr / mezo_eps (0: never).
    # The subspace delivers its gain in the first rounds, then plateaus (docs/RESULTS_discussion.md).
    subspace_rounds: int = 0
    mezo_lr: float | None = None  # unset: MEZO_DEFAULTS once subspace_rounds > 0; set while it is 0: refused
    mezo_eps: float | None = None
    p1: int = SPLIT_P1  # split: block-1 perturbations per step
    p2: int = SPLIT_P2  # split: block-2 perturbations per block-1 one
    # full-space rounds: perturbation seeds from a pool of this many per round, FedKSeed; 0 = off
    seed_pool: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KIND_DEFAULTS:
            raise ValueError(f"kind must be one of {sorted(KIND_DEFAULTS)}, got {self.kind!r}")
        for name, value in KIND_DEFAULTS[self.kind].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.local_steps < 1 or self.q < 1 or self.batch < 1 or self.k < 1 or self.guide_batches < 1:
            raise ValueError("local_steps, q, batch, k and guide_batches must be >= 1")
        if self.kind == "subspace" and not 4 <= self.k <= 128:
            raise ValueError(f"a subspace guide needs 4 <= k <= 128, got {self.k}")
        check_lambda(self.lam)
        if not 0.0 < self.mix_alpha <= 1.0:
            raise ValueError(f"mix_alpha must be in (0, 1], got {self.mix_alpha}")
        if self.lr < 0 or self.eps <= 0:
            raise ValueError("need lr >= 0 and eps > 0")
        if self.precondition not in ("none", "adam"):
            raise ValueError(f"precondition must be 'none' or 'adam', got {self.precondition!r}")
        if self.split_layer < -1 or self.split_layer == 0 or self.p1 < 1 or self.p2 < 1:
            raise ValueError(f"split_layer must be -1 (none) or a layer >= 1, p1 and p2 >= 1; got "
                             f"{self.split_layer}, {self.p1}, {self.p2}")
        if not 0.0 <= self.edge_weight <= 4.0:
            raise ValueError(f"edge_weight must be in [0, 4], got {self.edge_weight}")
        if isinstance(self.subspace_rounds, bool) or not isinstance(self.subspace_rounds, int) \
                or self.subspace_rounds < 0:
            raise ValueError(f"subspace_rounds must be an integer >= 0 (0: every round), got {self.subspace_rounds!r}")
        if self.subspace_rounds and not (self.guided and self.kind == "subspace"):
            raise ValueError("subspace_rounds switches a subspace run to full-space MeZO: it needs kind 'subspace'")
        idle = [name for name in MEZO_DEFAULTS if getattr(self, name) is not None]
        if idle and not self.subspace_rounds:
            raise ValueError(f"[train]: {idle} set the MeZO rounds after subspace_rounds, which is 0 (never)")
        if self.subspace_rounds:  # without MeZO rounds both stay None: nothing reads them
            for name, value in MEZO_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
            if not (self.mezo_lr >= 0.0 and self.mezo_eps > 0.0):
                raise ValueError(f"need mezo_lr >= 0 and mezo_eps > 0, got {self.mezo_lr}, {self.mezo_eps}")
        if isinstance(self.seed_pool, bool) or not isinstance(self.seed_pool, int) \
                or not 0 <= self.seed_pool <= 1 << 24:
            raise ValueError(f"seed_pool must be an integer in [0, 2**24] (0: off), got {self.seed_pool!r}")
        if self.seed_pool and self.guided and self.kind == "subspace" and not self.subspace_rounds:
            raise ValueError("seed_pool applies to full-space rounds; kind 'subspace' has none unless subspace_rounds "
                             "> 0 (its merge is already in c-space)")

    @property
    def subspace(self) -> bool:
        return self.guided and self.kind == "subspace"

    def at_round(self, round_id: int) -> TrainConfig:
        """What round ``round_id`` runs: this config, or past ``subspace_rounds`` plain full-space MeZO (no
        guidance, ``mezo_lr`` / ``mezo_eps``). A pure function of the config and the round, so every transport
        and every replay agrees on it."""
        if not self.subspace_rounds or round_id < self.subspace_rounds:
            return self
        return dataclasses.replace(self, guided=False, lr=self.mezo_lr, eps=self.mezo_eps, subspace_rounds=0,
                                   mezo_lr=None, mezo_eps=None)


@dataclass(frozen=True)
class CloudConfig:
    """What the cloud does with its public data (round v2, "the cloud leads"; cloud.lead.LeadConfig).

    ``warm_steps`` AdamW steps before round 0 (checkpointed in the state dir, resumable); ``round_steps`` more
    from θ_t each round, with the proximal weight ``prox`` toward θ_t; the subspace holds ``trajectory`` cloud
    trajectory directions and k − trajectory public gradients at the round's θ. ``ranks`` > 1: the guide starts
    ranks − 1 local processes and runs that backprop data parallel over them (cloud.distributed.LocalRanks; one
    host; for the daemon, torchrun is the other way and then ranks stays 1).
    """

    warm_steps: int = 40
    round_steps: int = 0
    lr: float = 1e-3
    batch: int = 16
    prox: float = 0.0
    trajectory: int = 1
    ranks: int = 1

    def __post_init__(self) -> None:
        # The one validation of these fields: cloud.lead.LeadConfig builds a CloudConfig to check its own.
        import math

        for name in ("warm_steps", "round_steps", "batch", "trajectory", "ranks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.warm_steps < 0:
            raise ValueError(f"warm_steps must be >= 0, got {self.warm_steps}")
        if self.round_steps < 0:
            raise ValueError(f"round_steps must be >= 0, got {self.round_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0.0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not (math.isfinite(self.prox) and self.prox >= 0.0):
            raise ValueError(f"prox must be a finite number >= 0, got {self.prox}")
        if self.trajectory < 0:
            raise ValueError(f"trajectory must be in 0..k-1, got {self.trajectory}")
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # HF folder or .gguf (dequantized to fp32); "" → no model (static guidance, tests/bench)
    device: str = ""  # "" → cuda if available else cpu
    rank: int = 8
    lora_alpha: float = 16.0  # the LoRA scale is lora_alpha / rank (AdapterSpec.alpha)
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] = ()
    train: str = "AB"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))


@dataclass(frozen=True)
class DataConfig:
    """The cloud's public data (cloud.public_data): a packaged set by name ("rotten_tomatoes",
    "movie_snippets", "tweets") or the operator's file/folder with its fields, label words and template."""

    source: str = "rotten_tomatoes"
    text_field: str = "text"
    label_field: str = "label"
    label_words: dict[str, str] = field(default_factory=lambda: {"0": "negative", "1": "positive"})
    template: str = "Review: {text}\nSentiment (positive or negative):"  # the edges' DEFAULT_TEMPLATE
    public_n: int = 256
    batch: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.public_n < 1 or self.batch < 1:
            raise ValueError("public_n and batch must be >= 1")
        if not self.source:
            raise ValueError("[data] source is empty")
        words = dict(self.label_words)
        if len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words.values()):
            raise ValueError(f"[data] label_words needs two or more non-empty words, got {words}")
        if len(set(words.values())) != len(words):
            raise ValueError(f"[data] label_words maps two labels to one word: {words}")
        if "{text}" not in self.template:
            raise ValueError(f"[data] template must contain {{text}}: {self.template!r}")
        object.__setattr__(self, "label_words", {str(k): str(v) for k, v in words.items()})


WIRE_GUIDANCE = ("q8", "q4", "fp16", "fp32", "adaptive")
WIRE_THETA = ("fp32", "adaptive")
# Adaptive mode A's relative L2 error per chunk when neither target nor budget is given. The basis U gets its own:
# what matters for U is the span, and at 0.2 span(Û) is within 7.2° of span(U) (docs/bench/wire_bytes.json,
# max_principal_angle_deg) while two mini-batch estimates of one gradient are ~82° apart (docs/bench/
# diagnostic.json, cos_gpriv_halves 0.14): the rotation is far inside the noise U is built from, for 8× fewer bytes.
DEFAULT_TARGET = 0.02  # θ deltas and g_B
BASIS_TARGET = 0.2  # U / Q


@dataclass(frozen=True)
class WireConfig:
    """How θ and guidance travel to the edges (cloud.theta_wire, cloud.engine.compress_guidance).

    ``guidance`` (Q / U and g_B): a fixed codec, or "adaptive" with mode A (``target``: relative L2 error per chunk)
    or mode B (``budget``: bytes for U, spent where they lower the error most). The edges and the cloud's replay
    both use the decoded bits.

    ``theta``: "fp32" sends θ exactly: as the round's replay records (a subspace round's c-space move, k numbers)
    to an edge that holds the previous θ and its subspace, else dense float32. "adaptive" does the same and, when
    no exact record exists (the cloud stepped, a missed subspace), makes the round's θ the previous one plus an
    adaptively compressed delta (mode A at ``target``, or mode B at ``theta_budget`` bytes) and sends that delta;
    what compression left out is added back after the merge (error feedback).
    """

    guidance: str = "adaptive"
    target: float = 0.0  # adaptive mode A (guidance and θ); 0 with no budget: BASIS_TARGET / DEFAULT_TARGET
    budget: int = 0  # guidance = "adaptive", mode B: bytes of the basis
    theta: str = "fp32"
    theta_budget: int = 0  # theta = "adaptive", mode B: bytes of a θ delta

    def __post_init__(self) -> None:
        if self.guidance not in WIRE_GUIDANCE:
            raise ValueError(f"[wire] guidance must be one of {list(WIRE_GUIDANCE)}, got {self.guidance!r}")
        if self.theta not in WIRE_THETA:
            raise ValueError(f"[wire] theta must be one of {list(WIRE_THETA)}, got {self.theta!r} (fp32: exact, as "
                             "replay records or dense; adaptive: a compressed delta with target or theta_budget)")
        if self.target < 0 or self.budget < 0 or self.theta_budget < 0:
            raise ValueError("[wire] target, budget and theta_budget must be >= 0")
        if self.target and self.budget:
            raise ValueError("[wire] give target (mode A) or budget (mode B), not both")
        if self.budget and self.guidance != "adaptive":
            raise ValueError(f"[wire] target/budget apply to guidance = 'adaptive', not {self.guidance!r}")
        if self.target and self.guidance != "adaptive" and self.theta != "adaptive":
            raise ValueError(f"[wire] target/budget apply to guidance = 'adaptive', not {self.guidance!r}")
        if self.theta_budget and self.theta != "adaptive":
            raise ValueError(f"[wire] theta_budget applies to theta = 'adaptive', not {self.theta!r}")

    def codec(self):
        """(basis codec, gradient codec) for protocol.messages.Guidance.from_guide."""
        if self.guidance != "adaptive":
            return self.guidance, self.guidance
        from protocol.codecs import AdaptiveConfig

        basis = (AdaptiveConfig(budget=self.budget) if self.budget
                 else AdaptiveConfig(target=self.target or BASIS_TARGET))
        return basis, AdaptiveConfig(target=self.target or DEFAULT_TARGET)

    def theta_codec(self):
        """The codec of a θ delta (an AdaptiveConfig), or None when θ goes exact only (``theta = "fp32"``)."""
        if self.theta != "adaptive":
            return None
        from protocol.codecs import AdaptiveConfig

        if self.theta_budget:
            return AdaptiveConfig(budget=self.theta_budget)
        return AdaptiveConfig(target=self.target or DEFAULT_TARGET)


@dataclass(frozen=True)
class GuideConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    tokens: dict[str, str] = field(default_factory=dict)  # client id → shared secret

    def __post_init__(self) -> None:
        for c, t in self.tokens.items():
            if not isinstance(c, str) or not isinstance(t, str) or not c or len(t) < 8:
                raise ValueError(f"client {c!r}: tokens must be strings of at least 8 characters")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuideConfig:
        """From a TOML-shaped mapping; unknown keys are errors (typos must not pass silently)."""
        for (section, key), why in RENAMED_KEYS.items():
            if key in dict(d.get(section, {})):
                raise ValueError(why)
        parts: dict[str, Any] = {}
        for name, typ in (("server", ServerConfig), ("rounds", RoundConfig), ("train", TrainConfig),
                          ("model", ModelConfig), ("data", DataConfig), ("cloud", CloudConfig),
                          ("wire", WireConfig)):
            sect = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(typ)}
            bad = set(sect) - known
            if bad:
                raise ValueError(f"[{name}]: unknown keys {sorted(bad)}")
            parts[name] = typ(**sect)
        # Settings that only one guidance kind reads are refused for the other, not silently ignored.
        train_sect = dict(d.get("train", {}))
        if parts["train"].kind == "subspace":
            unused = sorted(set(train_sect) & GUIDED_ONLY)
            if unused:
                raise ValueError(f"[train]: {unused} apply to kind = 'guided' only (this guide uses 'subspace')")
        elif d.get("cloud"):
            raise ValueError("[cloud] configures the leading cloud of kind = 'subspace'; this guide uses 'guided'")
        clients = dict(d.get("clients", {}))
        tokens = {str(k): str(v) for k, v in dict(clients.get("tokens", {})).items()}
        bad = set(d) - {"server", "rounds", "train", "model", "data", "cloud", "wire", "clients"}
        if bad:
            raise ValueError(f"unknown sections {sorted(bad)}")
        return cls(tokens=tokens, **parts)

    @classmethod
    def load(cls, path: str | Path | None) -> GuideConfig:
        if not path:
            return cls()
        try:
            with open(path, "rb") as f:
                return cls.from_dict(tomllib.load(f))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config {path} not found") from e
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e

    def override(self, **sections: dict[str, Any]) -> GuideConfig:
        """A copy with some fields replaced, e.g. ``override(server={"port": 0})`` (None values ignored)."""
        kw: dict[str, Any] = {}
        for name, changes in sections.items():
            if name == "tokens":
                kw["tokens"] = {**self.tokens, **changes}
                continue
            changes = {k: v for k, v in changes.items() if v is not None}
            if name == "train" and "kind" in changes:  # a new kind brings its own lr/ε unless given too
                changes = {"lr": None, "eps": None, **changes}
            kw[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **kw)
