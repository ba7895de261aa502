"""``edgezo train`` and ``edgezo eval``: the edge subcommands (registered by app/cli.py)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

from edge.calibration import Calibration, CalibrationError, calibration_path, metrics_with_calibration
from edge.client import add_guide_args, run_guided
from protocol.constants import SPLIT_P1, SPLIT_P2
from protocol.spec import LORA_TARGETS, AdapterSpec

DEFAULT_LABEL_WORDS = "positive=positive,negative=negative"


def parse_label_words(s: str) -> dict[str, str]:
    """'fresh=positive,rotten=negative' -> {'fresh': 'positive', 'rotten': 'negative'}."""
    out: dict[str, str] = {}
    for part in s.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--label-words entry {part!r} is not LABEL=WORD")
        k, v = part.split("=", 1)
        out[k.strip()] = v
    return out


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model GGUF (quantized is fine)")
    p.add_argument("--task", choices=["classification", "generation"], default="classification")
    p.add_argument("--text-field", default="text", help="column/key of the text (or prompt)")
    p.add_argument("--label-field", default="label", help="column/key of the label (or completion)")
    p.add_argument("--label-words", default=DEFAULT_LABEL_WORDS, help="LABEL=WORD,... (classification)")
    p.add_argument("--template", default=None, help="prompt template with {text}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all cores)")
    p.add_argument("--n-ctx", type=int, default=0,
                   help="KV cells per pass, all sequences of a batch (0: train fits it to the data's longest "
                        "batch, eval uses 2048)")
    p.add_argument("--max-eval", type=int, default=0, help="cap on evaluation examples (0: all)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``eval`` to the edgezo CLI."""
    t = sub.add_parser("train", help="zeroth-order adapter training through llama.cpp (no backprop)")
    _data_args(t)
    t.add_argument("--data", required=True, help="training data (.csv/.tsv/.jsonl, optionally .gz/.bz2)")
    t.add_argument("--eval-data", default=None, help="evaluation data (default: a held-out split of --data)")
    t.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share when --eval-data is absent")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--val-data", default=None,
                   help="private validation data: the classification threshold is fitted on it after training and "
                        "saved as OUT.calib.json (edgezo eval uses it)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="share of the training rows held out (seeded, disjoint) as that validation split")
    t.add_argument("--steps", type=int, default=None, help="local steps (required without --guide)")
    t.add_argument("--out", default=None, help="output adapter GGUF (llama.cpp LoRA; required without --guide)")
    t.add_argument("--ckpt", default=None, help="checkpoint path (default: OUT.ckpt.npz)")
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint exactly")
    t.add_argument("--kind", choices=["lora", "control"], default="lora",
                   help="adapter kind: LoRA, or a control vector (one direction per layer, layers 1..n-1)")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / rank)")
    t.add_argument("--targets", default="q_proj,v_proj", help=f"comma list of {list(LORA_TARGETS)}")
    t.add_argument("--layers", default="", help="comma list of layer indices (default: all)")
    t.add_argument("--train", choices=["AB", "B"], default="AB")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--eps", type=float, default=1e-2)
    t.add_argument("--q", type=int, default=1, help="perturbations per step")
    t.add_argument("--momentum", type=float, default=0.0)
    t.add_argument("--warmup", type=int, default=0)
    t.add_argument("--decay", choices=["constant", "cosine", "linear"], default="linear")
    t.add_argument("--split-layer", type=int, default=None,
                   help="FedSPZO split at layer S: block-2 passes run only layers >= S from captured states; "
                        "with every --layers >= S, frozen bottom (layers < S run once per example)")
    t.add_argument("--p1", type=int, default=SPLIT_P1, help="split: block-1 perturbations per step")
    t.add_argument("--p2", type=int, default=SPLIT_P2, help="split: block-2 perturbations per block-1 one")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--log", default=None, help="write the per-step history as JSON here")
    add_guide_args(t)  # --guide HOST:PORT --token ...: federated client mode (edge/client.py)
    t.set_defaults(handler=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model (+ adapter) on labelled data; prints JSON")
    _data_args(e)
    e.add_argument("--data", required=True)
    e.add_argument("--adapter", default=None, help="LoRA adapter or control-vector GGUF (edgezo train --out)")
    e.add_argument("--calibration", default=None,
                   help="calibration JSON (default: ADAPTER.calib.json when it exists, written by edgezo train --val-*)")
    e.add_argument("--no-calibration", action="store_true", help="ignore any saved calibration")
    e.add_argument("--predictions", default=None,
                   help="write one JSON line per example here: label, raw and calibrated prediction, scores")
    e.set_defaults(handler=cmd_eval)


def _build(args: argparse.Namespace):
    """Runtime and task from the shared arguments."""
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import DEFAULT_TEMPLATE, ClassificationTask, GenerationTask

    if args.n_ctx < 0:
        raise ValueError(f"--n-ctx must be >= 0, got {args.n_ctx}")
    # train with --n-ctx 0 starts small and fits the context to its data (Runtime.fit_context): a 2,048-cell
    # context made first would already count in the process's peak RSS
    auto = 256 if getattr(args, "command", "") == "train" else 2048
    rt = Runtime(args.model, RuntimeConfig(n_ctx=args.n_ctx or auto, n_seq_max=max(args.batch_size, 1),
                                           n_threads=args.threads))
    if args.task == "classification":
        task = ClassificationTask(rt, parse_label_words(args.label_words), args.template or DEFAULT_TEMPLATE)
    else:
        task = GenerationTask(rt, args.template or "{text}")
    return rt, task


def _rows(args: argparse.Namespace, path: str, task):
    from edge.data import load_rows

    labels = set(task.labels) if task.kind == "classification" else None
    ds = load_rows(path, args.text_field, args.label_field, labels)
    if ds.skipped:
        print(f"edgezo: {path}: skipped {ds.skipped} rows {ds.reasons}", file=sys.stderr)
        for line, why in ds.problems[:MAX_REPORTED_ROWS]:
            print(f"edgezo: {path}:{line}: {why}", file=sys.stderr)
        if len(ds.problems) > MAX_REPORTED_ROWS:
            print(f"edgezo: {path}: ... and {len(ds.problems) - MAX_REPORTED_ROWS} more skipped rows", file=sys.stderr)
    return ds.rows


MAX_REPORTED_ROWS = 50  # skipped rows named one by one on stderr; the rest are counted


def _fail(msg: str) -> int:
    print(f"edgezo: error: {msg}", file=sys.stderr)
    return 2


def _scores(trainer, task, data: list, bs: int) -> tuple:
    """(label-word scores (n, K), class indices (n,)) of encoded ``data`` with the trainer's θ."""
    import numpy as np

    trainer.adapter.write(trainer.theta)
    bs = max(bs, 1)
    parts = [task.scores(data[i : i + bs]) for i in range(0, len(data), bs)]
    s = np.concatenate(parts, axis=0) if parts else np.zeros((0, len(task.labels)), np.float32)
    return s, np.array([e.targets[0] for e in data], np.int64)


def _calibrate(trainer, task, val_rows: list, args: argparse.Namespace):
    """Fit the decision threshold on the private validation rows; save it next to ``--out``; print it."""
    from edge.calibration import Calibration

    s, y = _scores(trainer, task, [task.encode(r) for r in val_rows], args.batch_size)
    calib = Calibration.for_task(task, s, y)
    path = calib.save(calibration_path(args.out))
    rule = f"threshold {calib.threshold:+.4f} on the margin" if calib.threshold is not None else f"biases {calib.bias}"
    print(f"edgezo: calibration on {calib.n_val} private validation rows: accuracy raw {calib.val_accuracy_raw:.4f}, "
          f"calibrated {calib.val_accuracy_calibrated:.4f} ({rule}); saved {path}", file=sys.stderr)
    return calib


def cmd_train(args: argparse.Namespace) -> int:
    from edge.data import DataError, shuffle_split
    from edge.runtime import RuntimeErrorEZ
    from edge.tasks import TaskError
    from edge.train import TrainConfig, Trainer, train_loop

    if not args.guide and (args.steps is None or args.out is None):
        return _fail("train needs --steps and --out (or --guide HOST:PORT to let a guide drive the rounds)")
    if args.val_data and args.val_fraction is not None:
        return _fail("give --val-data or --val-fraction, not both")
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        return _fail(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    want_val = bool(args.val_data) or args.val_fraction is not None
    if args.out is not None:  # before any training: a run must never end on an output it cannot write
        folder = Path(args.out).resolve().parent
        if not folder.is_dir():
            return _fail(f"--out {args.out}: the folder {folder} does not exist (create it first)")
        if not os.access(folder, os.W_OK):
            return _fail(f"--out {args.out}: the folder {folder} is not writable")
    try:
        rt, task = _build(args)
        rows = _rows(args, args.data, task)
        if args.eval_data:
            train_rows, _ = shuffle_split(rows, args.seed)
            eval_rows = _rows(args, args.eval_data, task)
        else:
            train_rows, eval_rows = shuffle_split(rows, args.seed, args.eval_fraction)
        val_rows = []
        if task.kind != "classification" or args.guide:
            if want_val:  # refused, not ignored: an accepted flag must act
                why = "classification only" if task.kind != "classification" else "not done in --guide mode"
                return _fail(f"calibration is {why}: drop --val-data/--val-fraction")
        elif args.val_data:
            val_rows = _rows(args, args.val_data, task)
        elif args.val_fraction is not None:  # carved from the training rows: disjoint from train and eval
            train_rows, val_rows = shuffle_split(train_rows, args.seed + 1, args.val_fraction)
            if not val_rows:
                return _fail(f"--val-fraction {args.val_fraction} of {len(train_rows)} training rows is no row")
        else:
            print("edgezo: no --val-data / --val-fraction: no calibration saved (edgezo eval reports raw accuracy)",
                  file=sys.stderr)
        if args.max_eval:
            eval_rows = eval_rows[: args.max_eval]
        train_set = [task.encode(r) for r in train_rows]
        eval_set = [task.encode(r) for r in eval_rows]
        if not args.n_ctx:  # a KV cache no bigger than the longest batch needs (it is resident memory)
            val_lengths = [len(task.encode(r).tokens) for r in val_rows]
            rt.fit_context([len(e.tokens) for e in train_set + eval_set] + val_lengths, max(args.batch_size, 1))
        layers = tuple(int(x) for x in args.layers.split(",") if x.strip())
        if args.kind == "control":  # llama.cpp has no control-vector slot for layer 0
            spec = AdapterSpec("control", rt.dims(), layers=layers or tuple(range(1, rt.n_layer)))
        else:
            spec = AdapterSpec(
                "lora", rt.dims(), rank=args.rank, alpha=args.alpha,
                targets=tuple(x.strip() for x in args.targets.split(",") if x.strip()), layers=layers,
                train=args.train,
            )
        cfg = TrainConfig(
            steps=args.steps or 1, batch_size=args.batch_size, seed=args.seed, lr=args.lr, eps=args.eps,
            momentum=args.momentum, warmup=args.warmup, decay=args.decay, q=args.q,
            split_layer=args.split_layer, p1=args.p1, p2=args.p2,
        )
        trainer = Trainer(rt, task, train_set, spec, cfg)
        if trainer.mode == "frozen":
            print(f"edgezo: frozen bottom: layers < {args.split_layer} hold no adapter, they run once per example "
                  f"and every ZO pass runs layers {args.split_layer}..{rt.n_layer - 1} only", file=sys.stderr)
        elif trainer.mode == "split":
            print(f"edgezo: FedSPZO split at layer {args.split_layer} (p1 {args.p1}, p2 {args.p2}): block-2 passes "
                  f"run layers {args.split_layer}..{rt.n_layer - 1} from captured states", file=sys.stderr)
        if args.guide:  # the guide decides θ, schedule, λ and local steps for every round
            rc = run_guided(args, trainer)
            trainer.close()
            rt.close()
            return rc
        ckpt = Path(args.ckpt or (args.out + ".ckpt.npz"))
        if args.resume:
            if not ckpt.exists():
                return _fail(f"--resume: no checkpoint at {ckpt}")
            trainer.load_checkpoint(ckpt)
            print(f"edgezo: resumed from {ckpt} at step {trainer.step}", file=sys.stderr)
        history = train_loop(trainer, args.out, eval_set, args.eval_every, ckpt, args.ckpt_every, progress=not args.no_progress)
        if args.log:
            Path(args.log).write_text(json.dumps(history))
        summary = {"out": args.out, "steps": trainer.step, "rejected": trainer.rejected, "d": spec.d}
        calib = None
        if val_rows:
            calib = _calibrate(trainer, task, val_rows, args)
            summary["calibration"] = {
                "path": str(calibration_path(args.out)), "n_val": calib.n_val, "threshold": calib.threshold,
                "bias": calib.bias, "val_accuracy_raw": calib.val_accuracy_raw,
                "val_accuracy_calibrated": calib.val_accuracy_calibrated,
            }
        if eval_set:
            if task.kind == "classification":
                s, y = _scores(trainer, task, eval_set, args.batch_size)
                summary["eval"] = metrics_with_calibration(s, y, calib)
            else:
                summary["eval"] = trainer.evaluate(eval_set)
        print(json.dumps(summary))
        trainer.close()
        rt.close()
        return 0
    except (RuntimeErrorEZ, DataError, TaskError, CalibrationError, ValueError, KeyError, OSError) as e:
        return _fail(str(e))


def _eval_classification(task, rows: list, data: list, bs: int, calib, args: argparse.Namespace) -> dict:
    """Raw accuracy, accuracy under the SAVED calibration (never fitted here), and the oracle (best threshold
    on this very set); per-example predictions to ``--predictions``."""
    import numpy as np

    parts = [task.scores(data[i : i + bs]) for i in range(0, len(data), bs)]
    s = np.concatenate(parts, axis=0) if parts else np.zeros((0, len(task.labels)), np.float32)
    y = np.array([e.targets[0] for e in data], np.int64)
    result = metrics_with_calibration(s, y, calib)
    raw = s.argmax(1)
    cal = calib.predict(s) if calib is not None else None
    if args.predictions:
        from convert.atomic import atomic_open

        with atomic_open(Path(args.predictions), "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                rec = {"i": i, "text": row.text, "label": row.label, "raw": task.labels[raw[i]],
                       "calibrated": task.labels[cal[i]] if cal is not None else None,
                       "scores": [float(v) for v in s[i]]}
                f.write(json.dumps(rec) + "\n")
    if calib is not None:
        print(f"edgezo: accuracy raw {result['accuracy']:.4f}, calibrated {result['calibrated_accuracy']:.4f} "
              f"(saved calibration, fitted on {calib.n_val} private validation rows)", file=sys.stderr)
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    import llama_cpp

    from edge.adapter import (
        ControlAdapter,
        adapter_kind,
        check_adapter_fits,
        infer_spec,
        read_adapter_gguf,
        read_control_gguf,
    )
    from edge.data import DataError
    from edge.runtime import RuntimeErrorEZ, check_gguf
    from edge.tasks import TaskError

    try:
        calib, calib_path = None, None
        if not args.no_calibration:
            if args.calibration:
                calib_path = Path(args.calibration)
            elif args.adapter and calibration_path(args.adapter).exists():
                calib_path = calibration_path(args.adapter)
            if calib_path is not None:
                calib = Calibration.load(calib_path)
                if args.template is None and args.task == "classification":
                    args.template = calib.template  # score the prompt the threshold was fitted on
        rt, task = _build(args)
        if calib is not None and task.kind != "classification":
            print(f"edgezo: {calib_path} ignored: calibration is for classification", file=sys.stderr)
            calib = None
        if calib is not None:
            calib.check_task(task)
        handle = cvec = None
        if args.adapter and adapter_kind(check_gguf(args.adapter, "adapter")) == "control":
            spec, tensors, hint = read_control_gguf(args.adapter, rt.dims())
            if hint and hint != rt.arch:
                return _fail(f"control vector {args.adapter} is for architecture {hint!r}, model is {rt.arch!r}")
            cvec = ControlAdapter(rt, spec, tensors)
        elif args.adapter:
            tensors, alpha, arch = read_adapter_gguf(args.adapter, rt.dims())
            if arch != rt.arch:
                return _fail(f"adapter {args.adapter} is for architecture {arch!r}, model is {rt.arch!r}")
            check_adapter_fits(infer_spec(tensors, alpha, rt.dims()), rt, arch, tensors)
            handle = llama_cpp.llama_adapter_lora_init(rt.model, str(args.adapter).encode())
            if not handle:
                return _fail(f"llama.cpp rejected adapter {args.adapter} (tensor shapes do not fit this model?)")
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            llama_cpp.llama_set_adapters_lora(rt.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        rows = _rows(args, args.data, task)
        if args.max_eval:
            rows = rows[: args.max_eval]
        data = [task.encode(r) for r in rows]
        bs = max(args.batch_size, 1)
        if task.kind == "classification":
            result = _eval_classification(task, rows, data, bs, calib, args)
            result["calibration"] = str(calib_path) if calib is not None else None
        else:
            result = task.evaluate([data[i : i + bs] for i in range(0, len(data), bs)])
        print(json.dumps(result))
        if cvec:
            cvec.close()
        if handle:
            llama_cpp.llama_set_adapters_lora(rt.ctx, None, 0, None)
            llama_cpp.llama_adapter_lora_free(handle)
        rt.close()
        return 0
    except (RuntimeErrorEZ, DataError, TaskError, CalibrationError, ValueError, KeyError, OSError) as e:
        return _fail(str(e))
