"""What an edge keeps between rounds so that the guide can send θ as the moves since its last round (k numbers a
subspace round, cloud.theta_wire) instead of dense: the θ its last round *started* from and that round's guidance,
in ``state_dir`` so a restarted device keeps them. Never imports torch.

Files (each written by convert.atomic: tmp → fsync → rename, so a crash leaves the old or the new one): ``held-theta.npz`` (round id,
θ float32) and ``held-guidance.bin`` (the round's guidance as received, a GuidanceNext frame: compressed, and
validated like any frame when read back).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from convert.atomic import atomic_write_bytes
from protocol.errors import ProtocolError
from protocol.messages import Guidance, GuidanceNext, decode, encode, theta_digest
from protocol.zo import Guide


class HeldTheta:
    """The θ of the last round this edge started (``round_id``, ``theta``) and its guidance, on disk."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir)
        self.round_id = -1
        self.theta: np.ndarray | None = None
        self._guide_id = ""  # the guidance held-guidance.bin holds

    @property
    def digest(self) -> str:
        """theta_digest of the held θ ("" when none)."""
        return "" if self.theta is None else theta_digest(self.theta)

    def load(self) -> dict[str, Guide]:
        """Read the held θ and guidance back (after a restart); returns the decoded guidance by id. Files that are
        missing or unreadable are ignored: the guide then sends θ dense."""
        p = self.dir / "held-theta.npz"
        guides: dict[str, Guide] = {}
        try:
            with np.load(p) as z:
                self.round_id, self.theta = int(z["round_id"]), np.array(z["theta"], np.float32)
        except (OSError, KeyError, ValueError):
            self.round_id, self.theta = -1, None
            return guides
        try:
            msg = decode((self.dir / "held-guidance.bin").read_bytes())
        except (OSError, ProtocolError):
            return guides
        if isinstance(msg, GuidanceNext) and msg.guidance is not None:
            g = msg.guidance
            self._guide_id = g.guide_id or g.digest()
            guides[self._guide_id] = g.to_guide()
        return guides

    def save(self, round_id: int, theta: np.ndarray, guidance: Guidance | None) -> None:
        """Keep round ``round_id``'s starting θ and its guidance (as compressed; written only when it changed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if guidance is not None:
            gid = guidance.guide_id or guidance.digest()
            if gid != self._guide_id:
                atomic_write_bytes(self.dir / "held-guidance.bin",
                                   encode(GuidanceNext(round_id=round_id, ready=True, guidance=guidance)))
                self._guide_id = gid
        buf = io.BytesIO()
        np.savez(buf, round_id=np.int64(round_id), theta=np.asarray(theta, np.float32))
        atomic_write_bytes(self.dir / "held-theta.npz", buf.getvalue())
        self.round_id, self.theta = round_id, np.array(theta, np.float32, copy=True)

    def forget(self) -> None:
        """Hold nothing (in memory; the next save overwrites the files): the guide then sends θ dense."""
        self.round_id, self.theta = -1, None
