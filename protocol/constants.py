"""Every wire key string, message type name and hard limit, in one module.

Message *field* keys on the wire are the dataclass field names in :mod:`protocol.messages` (one place:
the dataclass); everything else that appears as a literal on the wire is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

# ---- frame envelope -----------------------------------------------------------------------------
HEADER_SIZE = 4  # big-endian uint32 body length
KEY_VERSION = "v"
KEY_TYPE = "type"
ENVELOPE_KEYS = (KEY_VERSION, KEY_TYPE)

# ---- message type names (the "type" value) -------------------------------------------------------
T_HELLO = "hello"
T_CHALLENGE = "challenge"
T_AUTH = "auth"
T_WELCOME = "welcome"
T_ROUND_REQUEST = "round_request"
T_ROUND_START = "round_start"
T_UPDATE = "update"
T_ACK = "ack"
T_ERROR = "error"
T_BYE = "bye"
T_STATUS_REQUEST = "status_request"
T_STATUS = "status"
T_GUIDANCE_REQUEST = "guidance_request"
T_GUIDANCE_NEXT = "guidance_next"

# ---- msgpack ext type codes ----------------------------------------------------------------------
EXT_NDARRAY = 1  # payload: dtype code u8, ndim u8, ndim x uint32 LE dims, raw little-endian bytes

# dtype code on the wire -> numpy dtype string (always little-endian). Never object, never pickle.
NDARRAY_DTYPES: dict[int, str] = {
    1: "|b1",
    2: "|u1",
    3: "|i1",
    4: "<u2",
    5: "<i2",
    6: "<u4",
    7: "<i4",
    8: "<u8",
    9: "<i8",
    10: "<f2",
    11: "<f4",
    12: "<f8",
}

# ---- compressed array (protocol.codecs.EncodedArray) map keys ------------------------------------
ENC_CODEC = "codec"
ENC_SHAPE = "shape"
ENC_DTYPE = "dtype"
ENC_PARAMS = "params"
ENC_PARTS = "parts"
ENC_KEYS = (ENC_CODEC, ENC_SHAPE, ENC_DTYPE, ENC_PARAMS, ENC_PARTS)

# ---- compact StepRecord list (protocol.messages.step_records_to_wire) keys -----------------------
STEPS_SEEDS = "seeds"  # uint64 (n,): every perturbation's seed, steps then groups in order
STEPS_GRADS = "grads"  # float32 (n,): the matching projected gradients
STEPS_N_GROUPS = "n_groups"  # groups per step: int when uniform, else uint array (n_steps,)
STEPS_SIZES = "sizes"  # perturbations per group: int when uniform, else uint array (n_groups,)
STEPS_SPAN_IDX = "span_idx"  # index into "spans" per group: int when uniform, else uint array
STEPS_SPANS = "spans"  # list of [start, stop] (stop -1: up to d)
STEPS_LAMS = "lams"  # λ per step: float when uniform, else float64 array (n_steps,)
STEPS_COUNT = "n_steps"
STEPS_KEYS = (STEPS_COUNT, STEPS_SEEDS, STEPS_GRADS, STEPS_N_GROUPS, STEPS_SIZES, STEPS_SPAN_IDX, STEPS_SPANS,
              STEPS_LAMS)

LAMBDA_ONLINE: Final = "online"  # λ = "online": each step estimates its own λ* (protocol.zo.Lambda)

# ---- auth ----------------------------------------------------------------------------------------
NONCE_SIZE = 32
MAC_SIZE = 32  # HMAC-SHA256
AUTH_DOMAIN = b"edgezo-auth-v1\x00"  # domain separation: this MAC can never be confused with another use

# ---- limits ---------------------------------------------------------------------------------------
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Hard limits applied while decoding; every one is checked before the corresponding allocation.

    max_frame: body bytes of one frame (checked on the 4-byte header, before reading the body);
    max_str / max_bin: bytes in one msgpack str / bin; max_list / max_map: items in one msgpack array / map;
    max_depth: nesting of msgpack containers; max_ndim: dimensions of one array;
    max_elements: elements of one array (raw or compressed, by its *declared* shape);
    max_total_elements: elements summed over all arrays one message declares (bounds decode-time memory).
    """

    max_frame: int = 256 * MiB
    max_str: int = 64 * 1024
    max_bin: int = 256 * MiB
    max_list: int = 1 << 20
    max_map: int = 1024
    max_depth: int = 32
    max_ndim: int = 8
    max_elements: int = 1 << 28
    max_total_elements: int = 1 << 29

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_frame >= 1 << 32:
            raise ValueError("Limits.max_frame must fit the 4-byte header (< 2**32)")


DEFAULT_LIMITS = Limits()
DEFAULT_MAX_FRAME = DEFAULT_LIMITS.max_frame
DEFAULT_TIMEOUT = 30.0  # seconds a started frame may take to arrive completely

# AdapterSpec bounds checked before AdapterSpec is built from untrusted input (it allocates per layer).
MAX_SPEC_LAYERS = 1024
MAX_SPEC_DIM = 1 << 20
MAX_SPEC_RANK = 4096

# String field sizes (characters) for identifiers and free text.
MAX_ID_LEN = 128
MAX_TEXT_LEN = 4096
MAX_GUIDE_IDS = 8  # guidance ids a client may list as held (RoundRequest.guide_ids)

# ---- FedSPZO split (DESIGN.md, "Split perturbation") ------------------------------------------------------
SPLIT_P1 = 1  # block-1 perturbations per step
SPLIT_P2 = 4  # block-2 perturbations per block-1 one (P2 > P1: block-2 passes are the cheap ones with reuse)
