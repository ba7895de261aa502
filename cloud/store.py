"""Durable guide state: SQLite in WAL mode (synchronous=FULL) plus atomic checkpoint files.

* An upload is committed (INSERT + COMMIT, fsynced by SQLite) before the daemon acknowledges it.
* Round plans and θ checkpoints are ``.npz`` files written tmp → fsync → ``os.replace`` → fsync(dir),
  so a reader sees the old or the new file, never a torn one. A plan keeps how its θ follows from the previous
  round's (a c-space move or a compressed delta, cloud.theta_wire) and, after a lossy delta, the carry its merge
  adds back; a θ checkpoint keeps the c-space move of the merge that made it.
* On restart the open round, its plan and every committed upload are read back: nothing acknowledged is lost.

Torch-free: the daemon runs (and the load bench runs) without the cloud extra.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from cloud.aggregate import RoundPlan, Upload
from convert.atomic import atomic_write_bytes
from protocol.arrays import packb, unpackb
from protocol.constants import DEFAULT_LIMITS
from protocol.messages import ReplayRound, step_records_from_wire, step_records_to_wire, theta_digest
from protocol.schema import _Ctx, _dump_fields, _load_fields
from protocol.zo import Guide, Schedule

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    basis_id TEXT NOT NULL,
    status TEXT NOT NULL,              -- open | closed
    selected TEXT NOT NULL,            -- JSON list of client ids
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,            -- wall-clock (time.time())
    closed_at REAL,
    n_uploads INTEGER DEFAULT 0,
    public_loss REAL,
    client_loss REAL,
    down_bytes INTEGER,                -- bytes sent to clients this round (RoundStarts + prefetches)
    up_bytes INTEGER                   -- bytes of the uploads received
);
CREATE TABLE IF NOT EXISTS uploads (
    round_id INTEGER NOT NULL,
    client TEXT NOT NULL,
    examples INTEGER NOT NULL,
    loss_before REAL,
    loss_after REAL,
    steps BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (round_id, client)
);
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    last_seen REAL,
    uploads INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Store:
    """The guide's state directory: ``state.db`` + ``plan-<round>.npz`` + ``theta-<round>.npz``."""

    def __init__(self, *, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"state dir {self.root} is a file, not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "state.db"
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(rounds)").fetchall()}
            for col in ("down_bytes", "up_bytes"):  # a state dir from before bytes were kept per round
                if col not in cols:
                    self.db.execute(f"ALTER TABLE rounds ADD COLUMN {col} INTEGER")
        except sqlite3.DatabaseError as e:  # not a database, or a damaged one: the file is left as it is
            self.db.close()
            raise ValueError(f"{path} cannot be read as the guide's state ({e}): restore it from a backup, or point "
                             "[server] state_dir at an empty folder to start over") from e
        # uploads per multi-row INSERT: 7 parameters each, within this SQLite's limit (32,766 since 3.32, 999 before)
        limit = self.db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if hasattr(self.db, "getlimit") else 999
        self._rows = max(1, min(1000, limit // 7))

    def close(self) -> None:
        self.db.close()

    # ---- meta ----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ---- θ checkpoints -------------------------------------------------------------------------
    def save_theta(self, round_id: int, theta: np.ndarray, move: np.ndarray | None = None) -> None:
        """θ at the start of ``round_id`` (θ_t), atomically; ``move``: the c-space move of the merge that made it
        (cloud.aggregate.subspace_move), which lets edges rebuild θ_t from θ_{t-1} (cloud.theta_wire)."""
        arrays = {"theta": np.asarray(theta, np.float32)}
        if move is not None:
            arrays["move"] = np.asarray(move, np.float64)
        atomic_write_bytes(self.root / f"theta-{round_id}.npz", _npz_bytes(**arrays))

    def load_theta(self, round_id: int) -> np.ndarray | None:
        p = self.root / f"theta-{round_id}.npz"
        if not p.exists():
            return None
        with np.load(p) as z:
            return np.array(z["theta"], np.float32)

    def load_move(self, round_id: int) -> np.ndarray | None:
        """The c-space move of round ``round_id - 1``'s merge (None: not a subspace round, or not kept)."""
        p = self.root / f"theta-{round_id}.npz"
        if not p.exists():
            return None
        with np.load(p) as z:
            return np.array(z["move"], np.float64) if "move" in z else None

    # ---- rounds --------------------------------------------------------------------------------
    def open_round(self, plan: RoundPlan, *, selected: list[str], deadline: float,
                   move: ReplayRound | None = None) -> None:
        """Persist the plan file, then the round row (a round row always has its plan on disk). ``move``: how the
        plan's θ follows from the previous round's (cloud.theta_wire: a c-space move or a compressed delta)."""
        g = plan.guide
        arrays = {"theta": plan.theta}
        if g is not None:
            arrays["basis"] = g.basis
            if g.grad is not None:
                arrays["grad"] = g.grad
        if plan.carry is not None:
            arrays["carry"] = np.asarray(plan.carry, np.float32)
        if move is not None:
            arrays["move"] = np.frombuffer(packb(_dump_fields(move)), np.uint8)
        meta = {
            "alpha": None if g is None else g.alpha, "kind": None if g is None else g.kind,
            "edge_weight": plan.edge_weight, "lam": plan.lam, "local_steps": plan.local_steps,
            "first_step": plan.first_step, "schedule": plan.schedule.__dict__, "basis_id": plan.basis_id,
            "theta_digest": theta_digest(plan.theta),
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        atomic_write_bytes(self.root / f"plan-{plan.round_id}.npz", _npz_bytes(**arrays))
        self.db.execute(
            "INSERT OR REPLACE INTO rounds (round_id, basis_id, status, selected, opened_at, deadline) "
            "VALUES (?, ?, 'open', ?, ?, ?)",
            (plan.round_id, plan.basis_id, json.dumps(selected), time.time(), deadline),
        )

    def load_plan(self, round_id: int) -> RoundPlan:
        with np.load(self.root / f"plan-{round_id}.npz") as z:
            meta = json.loads(bytes(z["meta"]).decode())
            guide = None
            if meta["alpha"] is not None:
                guide = Guide(basis=z["basis"], alpha=meta["alpha"], grad=z["grad"] if "grad" in z else None,
                              kind=meta.get("kind", "guided"))
            return RoundPlan(round_id=round_id, basis_id=meta["basis_id"], theta=np.array(z["theta"], np.float32),
                             guide=guide, schedule=Schedule(**meta["schedule"]), lam=float(meta["lam"]),
                             local_steps=int(meta["local_steps"]), first_step=int(meta["first_step"]),
                             edge_weight=float(meta.get("edge_weight", 1.0)),
                             carry=np.array(z["carry"], np.float32) if "carry" in z else None)

    def load_wire(self, round_id: int) -> tuple[str, ReplayRound | None] | None:
        """(digest of round ``round_id``'s θ, the move that reached it from the previous round's or None), or None
        when the round has no plan on disk. Reads the plan file's small members only."""
        p = self.root / f"plan-{round_id}.npz"
        if not p.exists():
            return None
        with np.load(p) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            digest = meta.get("theta_digest") or theta_digest(np.array(z["theta"], np.float32))
            move = None
            if "move" in z:
                body = bytes(np.asarray(z["move"], np.uint8))
                move = _load_fields(ReplayRound, unpackb(body), _Ctx(DEFAULT_LIMITS, len(body)), "move")
            return digest, move

    def open_round_row(self) -> dict | None:
        row = self.db.execute(
            "SELECT round_id, selected, deadline FROM rounds WHERE status='open' ORDER BY round_id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return {"round_id": int(row[0]), "selected": json.loads(row[1]), "deadline": float(row[2])}

    def last_round_id(self) -> int:
        row = self.db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        return -1 if row[0] is None else int(row[0])

    def close_round(self, round_id: int, theta_next: np.ndarray, *, n_uploads: int, public_loss: float | None,
                    client_loss: float | None, move: np.ndarray | None = None, down_bytes: int | None = None,
                    up_bytes: int | None = None) -> None:
        """θ_{t+1} checkpoint first (with the merge's c-space ``move``), then the row with the round's bytes each
        way: a closed round always has its successor's θ on disk."""
        self.save_theta(round_id + 1, theta_next, move)
        self.db.execute(
            "UPDATE rounds SET status='closed', closed_at=?, n_uploads=?, public_loss=?, client_loss=?, "
            "down_bytes=?, up_bytes=? WHERE round_id=?",
            (time.time(), n_uploads, public_loss, client_loss, down_bytes, up_bytes, round_id),
        )

    def rounds(self, limit: int = 20) -> list[dict]:
        cur = self.db.execute(
            "SELECT round_id, status, n_uploads, public_loss, client_loss, opened_at, closed_at, selected, "
            "down_bytes, up_bytes FROM rounds ORDER BY round_id DESC LIMIT ?", (limit,))
        keys = ["round", "status", "uploads", "public_loss", "client_loss", "opened_at", "closed_at", "selected",
                "down_bytes", "up_bytes"]
        out = []
        for r in cur.fetchall():
            d = dict(zip(keys, r, strict=False))
            d["selected"] = len(json.loads(d["selected"]))
            out.append(d)
        return out[::-1]

    # ---- uploads -------------------------------------------------------------------------------
    def commit_uploads(self, uploads: list[Upload]) -> None:
        """Insert uploads in ONE transaction (group commit); returns after the fsynced COMMIT.

        A few multi-row statements, not two per upload: the daemon calls this on its store thread while its event
        loop decodes the next uploads, and each statement gives the GIL up and waits to take it back (up to the
        5 ms switch interval while the loop is busy), which made a 700-upload batch take 160 ms instead of 15."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for i in range(0, len(uploads), self._rows):
                part = uploads[i:i + self._rows]
                rows = [(up.round_id, up.client, up.examples, up.loss_before, up.loss_after,
                         packb(step_records_to_wire(up.steps)), now) for up in part]
                self.db.execute("INSERT INTO uploads VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(rows)),
                                [x for row in rows for x in row])
                self.db.execute("INSERT INTO clients (client, last_seen, uploads) VALUES "
                                + ",".join(["(?, ?, 1)"] * len(part))
                                + " ON CONFLICT(client) DO UPDATE SET last_seen=excluded.last_seen, uploads=uploads+1",
                                [x for up in part for x in (up.client, now)])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def uploads(self, round_id: int) -> list[Upload]:
        rows = self.db.execute(
            "SELECT client, examples, loss_before, loss_after, steps FROM uploads WHERE round_id=? ORDER BY client",
            (round_id,)).fetchall()
        basis = self.db.execute("SELECT basis_id FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        out = []
        for client, ex, lb, la, blob in rows:
            steps = step_records_from_wire(unpackb(blob))
            out.append(Upload(client=client, round_id=round_id, basis_id=basis[0] if basis else "", steps=steps,
                              examples=int(ex), loss_before=_f(lb), loss_after=_f(la)))
        return out

    def clients(self) -> list[dict]:
        cur = self.db.execute("SELECT client, last_seen, uploads FROM clients ORDER BY client")
        return [{"client": c, "last_seen": ls, "uploads": n} for c, ls, n in cur.fetchall()]


def upload_digest(up: Upload) -> str:
    """sha256 of what an upload says (its steps as stored, examples, losses): a re-send is a duplicate only when
    it says exactly the same."""
    import hashlib
    import struct

    h = hashlib.sha256(packb(step_records_to_wire(up.steps)))
    h.update(struct.pack("<qdd", up.examples, _f(up.loss_before), _f(up.loss_after)))
    return h.hexdigest()


def _f(x) -> float:
    return float("nan") if x is None else float(x)

