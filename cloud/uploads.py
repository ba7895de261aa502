"""The guide's upload path: validate, cap, detect forged duplicates, group-commit to SQLite, then ack."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cloud.aggregate import Upload, UploadRefused
from cloud.connections import _Refuse
from cloud.engine import accept_update, upload_of
from cloud.store import upload_digest
from protocol.messages import (
    Ack,
    Message,
    Update,
)


class UploadsMixin:
    """GuideServer's uploads (mixed into cloud.daemon.GuideServer: it reads the server's state)."""

    # ---- uploads (group commit) ------------------------------------------------------------------
    async def _commit(self, up: Upload) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((up, fut))
        if not self._flushing:
            asyncio.ensure_future(self._flush())
        await fut

    async def _flush(self) -> None:
        self._flushing = True
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._db(self.store.commit_uploads, [u for u, _ in batch])
                except Exception as e:  # noqa: BLE001 - e.g. a duplicate: fall back to one by one
                    for u, f in batch:
                        try:
                            await self._db(self.store.commit_uploads, [u])
                            f.set_result(None)
                        except Exception as e1:  # noqa: BLE001
                            f.set_exception(_Refuse("store", f"{type(e1).__name__}: {e1}"))
                    self.log("commit_retry", error=str(e))
                    continue
                for _, f in batch:
                    if not f.done():
                        f.set_result(None)
        finally:
            self._flushing = False


    def _timings_summary(self) -> dict[str, dict[str, float]]:
        """The open round's service times in ms (p50 / p99 / max): ``commit_ms`` from an accepted Update handed to
        the store to its COMMIT, ``ack_ms`` from the decoded Update to its Ack written and drained (the guide's
        share of a client's ack latency; the network and the client's own loop add the rest)."""
        out = {}
        for name, xs in self.timings.items():
            if xs:
                a = np.asarray(xs) * 1e3
                out[f"{name}_ms"] = {"p50": round(float(np.percentile(a, 50)), 2),
                                     "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}
        return out

    def _bytes_summary(self) -> dict[str, int]:
        """Bytes of the current round each way: totals, per RoundStart sent and per Update received, and how many
        RoundStarts carried θ as replay records (moves since the client's θ) or dense."""
        b = self.bytes
        return {"down_bytes": b["down"], "down_bytes_per_client": b["down"] // max(1, b["round_starts"]),
                "up_bytes": b["up"], "up_bytes_per_upload": b["up"] // max(1, b["updates"]),
                "theta_replay": b["theta_replay"], "theta_dense": b["theta_dense"]}

    async def _on_update(self, client: str, msg: Update, size: int) -> Message:
        """Validate, commit, then Ack ``msg`` (a frame of ``size`` bytes) from ``client``, or refuse it."""
        plan = self.plan
        rid = msg.round_id
        if plan is None or self.closing:
            raise _Refuse("round_closed", f"no open round accepts uploads (upload for round {rid})")
        if client in self.uploaded and rid == plan.round_id:
            return self._duplicate(client, msg)  # idempotent re-send after a lost ack, if byte-identical
        inflight = self._inflight.get(client)
        if inflight is not None and rid == plan.round_id:  # the same upload on a second connection
            await asyncio.shield(inflight)
            return self._duplicate(client, msg)
        if client not in self.selected:
            raise _Refuse("not_selected", f"client {client} is not in round {plan.round_id}")
        if msg.client_id != client:
            raise _Refuse("refused", f"update names client {msg.client_id!r}, connection is {client!r}")
        try:
            up = accept_update(plan, client, msg, d=self.spec.d, example_cap=self._example_cap())
        except UploadRefused as e:
            return Ack(round_id=rid, accepted=False, reason=str(e)[:4000])
        self._log_capped(client, msg, up)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[client] = fut  # reserved before the await: a concurrent duplicate waits for this commit
        t_commit = time.perf_counter()
        try:
            await self._commit(up)
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(_Refuse("store", f"upload not stored: {e}"))
            fut.exception()  # mark retrieved
            raise
        finally:
            self._inflight.pop(client, None)
        self.uploaded.add(client)  # committed: only now may it be acknowledged or counted
        self.timings["commit"].append(time.perf_counter() - t_commit)
        self._stored[client] = up
        self.stats["uploads"] += 1
        self.bytes["up"] += size
        self.bytes["updates"] += 1
        # the log line is written after the Ack is handed to the transport: the ack waits on nothing but the commit
        asyncio.get_running_loop().call_soon(lambda: self.log(
            "upload", round=up.round_id, client=client, steps=len(up.steps), examples=up.examples,
            loss_after=up.loss_after, lam=float(np.mean([st.lam for st in up.steps])), bytes=size))
        if len(self.uploaded) >= len(self.selected):
            self._round_done.set()
        return Ack(round_id=up.round_id, accepted=True)

    def _example_cap(self) -> int:
        """The most examples an upload is weighted by: ``[rounds] max_examples``; 0: local steps × batch, what one
        round can use (cloud.engine.upload_of applies it)."""
        return self.cfg.rounds.max_examples or self.plan.local_steps * self.cfg.train.batch

    def _log_capped(self, client: str, msg: Update, up: Upload) -> None:
        if up.examples < msg.n_examples:
            self.stats["examples_capped"] += 1
            self.log("examples_capped", client=client, claimed=int(msg.n_examples), used=up.examples)

    def _as_upload(self, client: str, msg: Update) -> Upload:
        """The Upload the guide stores for ``msg`` (example count capped by the server)."""
        return upload_of(self.plan, client, msg, example_cap=self._example_cap())

    def _duplicate(self, client: str, msg: Update) -> Ack:
        """A second upload for a round: acknowledged only if it says exactly what the stored one says."""
        stored = self._stored.get(client)
        if stored is not None and upload_digest(self._as_upload(client, msg)) == upload_digest(stored):
            return Ack(round_id=msg.round_id, accepted=True, reason="duplicate")
        self.stats["forged_duplicates"] += 1
        self.log("duplicate_refused", client=client, round=msg.round_id)
        raise _Refuse("duplicate", f"client {client} already uploaded a different update for round {msg.round_id}")
