"""The edge as a Flower ``ClientApp`` (``pip install edgezo[flower]``): a SuperNode's device trains through llama.cpp.

A round arrives as a Flower message whose ``edgezo`` ConfigRecord holds one encoded RoundStart frame
(:mod:`protocol.flower`): dense fp32 θ'_t with its digest, the compressed guidance, the schedule and the [train]
settings. The device runs the round with the same trainer as ``edgezo train --guide`` (:class:`edge.train.Trainer`
behind :class:`edge.round_trainer.EdgeTrainerAdapter`, the same ``round_inputs`` / ``train_round_start`` /
``round_update`` the TCP client runs) and replies with one encoded Update frame: (seed, g) records the ServerApp
replays exactly. No pickle, no torch.

What the device trains on is its own: the SuperNode's ``--node-config`` names the model and the data, e.g.::

    flower-supernode --superlink HOST:9093 --root-certificates ca.pem \\
        --node-config 'model="/models/SmolLM2-135M-Instruct.Q4_1.gguf" data="/data/private.csv" threads=4'

Keys: ``model`` (GGUF, required), ``data`` (.csv/.tsv/.jsonl, required), ``task`` ("classification" or
"generation"), ``text-field``, ``label-field``, ``label-words`` ("LABEL=WORD,..."), ``template``, ``threads`` (0: all
cores), ``seed`` (0: derived from the node id, so devices draw different perturbations). The adapter's layout is the
guide's (the RoundStart's spec); a model whose sizes do not match it is refused.

Flower's SuperNode starts one ClientApp process per message, so the model and data are loaded once per round;
on a 135M model that is about a second, small next to the round's forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge.round_trainer import EdgeTrainerAdapter, client_seed, round_inputs, round_update, train_round_start
from protocol.flower import FRAME, METRICS, RECORD, client_name, frame_entry, message_from_entry
from protocol.messages import RoundStart
from protocol.spec import AdapterSpec

DEFAULT_LABEL_WORDS = "positive=positive,negative=negative"  # edgezo train's default (edge.commands)


@dataclass(frozen=True)
class NodeSettings:
    """What a SuperNode's ``--node-config`` tells its ClientApp: the device's model, its private data, threads."""

    model: str
    data: str
    task: str = "classification"
    text_field: str = "text"
    label_field: str = "label"
    label_words: str = DEFAULT_LABEL_WORDS
    template: str = ""
    threads: int = 0
    seed: int = 0

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> NodeSettings:
        """Settings from a node config (keys with dashes, as Flower's ``--node-config`` writes them).

        Raises ValueError naming the key for a missing model/data or a value of the wrong kind."""
        for key in ("model", "data"):
            if not isinstance(cfg.get(key), str) or not cfg[key]:
                raise ValueError(f"the SuperNode's --node-config needs {key}=\"PATH\" (got {cfg.get(key)!r})")
        task = str(cfg.get("task", "classification"))
        if task not in ("classification", "generation"):
            raise ValueError(f"node config task must be classification or generation, got {task!r}")
        try:
            threads, seed = int(cfg.get("threads", 0)), int(cfg.get("seed", 0))
        except (TypeError, ValueError) as e:
            raise ValueError(f"node config threads and seed must be integers: {e}") from None
        return cls(model=str(cfg["model"]), data=str(cfg["data"]), task=task,
                   text_field=str(cfg.get("text-field", "text")), label_field=str(cfg.get("label-field", "label")),
                   label_words=str(cfg.get("label-words", DEFAULT_LABEL_WORDS)), template=str(cfg.get("template", "")),
                   threads=threads, seed=seed)


def build_trainer(settings: NodeSettings, rs: RoundStart, *, seed: int):
    """(Trainer, Runtime) for this device's model and data with the guide's adapter layout, built as
    ``edgezo train --guide`` builds it (edge.commands): runtime, task, every usable row, a context fitted to them."""
    from edge.commands import parse_label_words
    from edge.data import load_rows
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import DEFAULT_TEMPLATE, ClassificationTask, GenerationTask
    from edge.train import TrainConfig, Trainer

    h = rs.hyper
    batch = max(int(h.batch_size), 1)
    rt = Runtime(settings.model, RuntimeConfig(n_ctx=256, n_seq_max=batch, n_threads=settings.threads))
    try:
        spec: AdapterSpec = rs.spec
        if rt.dims() != spec.dims:
            raise ValueError(f"the guide's adapter is for a model of {spec.dims}, {settings.model} is {rt.dims()}")
        if settings.task == "classification":
            task = ClassificationTask(rt, parse_label_words(settings.label_words),
                                      settings.template or DEFAULT_TEMPLATE)
        else:
            task = GenerationTask(rt, settings.template or "{text}")
        labels = set(task.labels) if task.kind == "classification" else None
        rows = load_rows(settings.data, settings.text_field, settings.label_field, labels).rows
        train_set = [task.encode(r) for r in rows]
        rt.fit_context([len(e.tokens) for e in train_set], batch)  # a KV cache no bigger than a batch needs
        cfg = TrainConfig(batch_size=batch, seed=seed, q=h.q, split_layer=h.split_layer if h.split_layer >= 0 else None,
                          p1=h.p1, p2=h.p2)
        return Trainer(rt, task, train_set, spec, cfg), rt
    except BaseException:
        rt.close()
        raise


def run_round(msg: Message, context: Context) -> Message:
    """One round on this device: RoundStart frame in, Update frame out (and timings as a MetricRecord)."""
    t0 = time.perf_counter()
    rs = message_from_entry(msg.content.config_records.get(RECORD), RoundStart)
    settings = NodeSettings.from_node_config(context.node_config)
    name = client_name(context.node_id)
    theta, guide, gid = round_inputs(rs, {})  # a fresh process per message: nothing prefetched
    trainer, rt = build_trainer(settings, rs, seed=settings.seed or client_seed(name) % (2**31))
    try:
        t1 = time.perf_counter()
        res = train_round_start(EdgeTrainerAdapter(trainer=trainer), rs, theta, guide)
        train_s = time.perf_counter() - t1
    finally:
        trainer.close()
        rt.close()
    entry = frame_entry(round_update(rs, res, client_id=name, guide_id=gid, duration_s=train_s))
    metrics = MetricRecord({"train_s": train_s, "load_s": t1 - t0, "forward_passes": res.forward_passes,
                            "up_bytes": len(entry[FRAME])})
    return Message(RecordDict({RECORD: ConfigRecord(entry), METRICS: metrics}), reply_to=msg)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's entry point for a ``train`` message: run the edgezo round it carries."""
    return run_round(msg, context)
