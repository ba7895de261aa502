"""The round-v2 study's report: docs/RESULTS.md and its plots from the JSON that bench/convergence.py wrote.

    .venv/bin/python bench/convergence_report.py --runs docs/bench/study --out docs

Pure in its input: the same JSON regenerates the same Markdown (plots aside, which matplotlib may vary).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

NAMES = {"mezo": "(a) MeZO from scratch", "mezo_warm": "(b) MeZO warm-started from θ_0",
         "guided": "(c) guided + rectified (first design)", "edgezo": "(d) edgezo round v2",
         "edgezo-sw3": "(d′) round v2, federated MeZO after 3 rounds",
         "fedkseed": "(e) FedKSeed-style", "cloud_only": "(f) cloud only (θ_0)",
         "backprop": "(g) backprop on pooled private data"}
ZO = ("mezo", "mezo_warm", "guided", "edgezo", "edgezo-sw3", "fedkseed")
# (d) and its variants that the targets are measured for: (d′) is [train] subspace_rounds = 3 (picked on validation)
D_ARMS = {"edgezo": "(d)", "edgezo-sw3": "(d′)"}
BUDGETS = (600, 2000)


def load(runs: Path) -> tuple[dict[str, list[dict]], dict, dict]:
    """{arm: [record per seed]}, the study config, and the RSS record (if measured). A variant in runs/variants/
    (``<arm>-<tag>-s<seed>.json``) is an arm of its own, ``<arm>-<tag>``, when :data:`NAMES` lists it."""
    recs: dict[str, list[dict]] = {}
    for p in sorted(runs.glob("*-s*.json")) + sorted((runs / "variants").glob("*-s*.json")):
        arm = p.stem.rsplit("-s", 1)[0]  # the file's name, not its "arm" field: a variant records its base arm
        if arm in NAMES:
            recs.setdefault(arm, []).append(json.loads(p.read_text()))
    cfg = json.loads((runs / "config.json").read_text()) if (runs / "config.json").exists() else {}
    rss = json.loads((runs / "rss.json").read_text()) if (runs / "rss.json").exists() else {}
    return recs, cfg, rss


def at_budget(rec: dict, budget: int, key: str) -> float | None:
    """Accuracy at the last evaluated point with ≤ ``budget`` edge forward passes (ZO arms)."""
    pts = [c for c in rec["curve"] if c["forward_passes"] <= budget]
    return pts[-1][key] if pts and pts[-1]["forward_passes"] == budget else None


def final(rec: dict, key: str) -> float:
    return rec["curve"][-1][key]


def mean_sd(xs: list[float | None]) -> tuple[float, float, int] | None:
    v = [x for x in xs if x is not None]
    if not v:
        return None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt(ms: tuple[float, float, int] | None) -> str:
    if ms is None:
        return "–"
    m, s, n = ms
    return f"{100 * m:.1f} ± {100 * s:.1f} (n={n})" if n > 1 else f"{100 * m:.1f} (n=1)"


def summary(recs: dict[str, list[dict]]) -> dict:
    """Per arm: mean ± sd raw/calibrated at each budget (ZO) or final (torch arms), time and bytes."""
    out: dict[str, dict] = {}
    for arm, rs in recs.items():
        row: dict = {"seeds": sorted(r["seed"] for r in rs)}
        for key in ("acc", "acc_calibrated"):
            if arm in ZO:
                for b in BUDGETS:
                    row[f"{key}@{b}"] = mean_sd([at_budget(r, b, key) for r in rs])
                row[f"{key}@0"] = mean_sd([r["curve"][0][key] for r in rs])
            else:
                row[f"{key}@final"] = mean_sd([final(r, key) for r in rs])
                row[f"{key}@0"] = mean_sd([r["curve"][0][key] for r in rs])
        row["train_s"] = float(np.mean([r.get("train_s", 0.0) for r in rs]))
        if rs[0].get("bytes_per_round"):
            row["bytes"] = {k: float(np.mean([r["bytes_per_round"][k] for r in rs])) for k in rs[0]["bytes_per_round"]}
        out[arm] = row
    return out


def reach(rec: dict, target: float, key: str) -> int | None:
    """Edge forward passes at which ``rec`` first reaches ``target`` (None: never)."""
    for c in rec["curve"]:
        if c[key] >= target:
            return c["forward_passes"]
    return None


def targets(s: dict, recs: dict, budget: int = 2000, arm: str = "edgezo") -> list[str]:
    """The issue's targets for ``arm`` ((d) or a variant of it), each with its measured value (calibrated accuracy
    at ``budget`` forwards; means)."""
    def m(arm: str, col: str) -> float | None:
        v = s.get(arm, {}).get(col)
        return None if v is None else v[0]

    dn = D_ARMS[arm]
    d, f = m(arm, f"acc_calibrated@{budget}"), m("cloud_only", "acc_calibrated@final")
    g, b = m("backprop", "acc_calibrated@final"), m("mezo_warm", f"acc_calibrated@{budget}")
    a = m("mezo", f"acc_calibrated@{budget}")
    lines = []

    def line(name: str, ok: bool | None, text: str) -> None:
        lines.append(f"| {name} (at {budget:,}) | {text} | {'met' if ok else ('–' if ok is None else '**missed**')} |")

    pp = lambda x: f"{100 * x:.1f}"  # noqa: E731
    line(f"{dn} ≥ (f) + 3 points calibrated", None if d is None or f is None else d >= f + 0.03,
         "–" if d is None or f is None else f"{pp(d)} vs {pp(f)} + 3 = {pp(f + 0.03)} ({100 * (d - f):+.1f})")
    line(f"{dn} within 2 points of (g)", None if d is None or g is None else d >= g - 0.02,
         "–" if d is None or g is None else f"{pp(d)} vs {pp(g)} ({100 * (d - g):+.1f})")
    line(f"{dn} ≥ (b) + 2 points", None if d is None or b is None else d >= b + 0.02,
         "–" if d is None or b is None else f"{pp(d)} vs {pp(b)} ({100 * (d - b):+.1f})")
    if a is not None and arm in recs:
        fw = [reach(r, a, "acc_calibrated") for r in recs[arm]]
        ok = all(x is not None and x * 10 <= budget for x in fw)
        line(f"{dn} reaches (a)'s final accuracy in ≥ 10× fewer forwards", ok,
             f"(a) ends at {pp(a)} after {budget:,}; {dn} reaches it after {fw} forwards (seeds {s[arm]['seeds']})")
    return lines


def plot(recs: dict[str, list[dict]], out: Path, key: str, xkey: str, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arm in enumerate(a for a in NAMES if a in recs and a in ZO):
        rs = recs[arm]
        fps = sorted({c["forward_passes"] for r in rs for c in r["curve"]})  # seeds may stop at different budgets
        pts = [[c for r in rs for c in r["curve"] if c["forward_passes"] == fp] for fp in fps]
        xs = np.array([np.mean([c[xkey] for c in p]) for p in pts], float)
        mu = np.array([np.mean([c[key] for c in p]) for p in pts])
        sd = np.array([np.std([c[key] for c in p]) for p in pts])
        ns = sorted({len(p) for p in pts})
        ax.plot(xs, 100 * mu, "o-", color=f"C{i}", label=f"{NAMES[arm]} (n={'–'.join(map(str, ns))})", ms=3)
        if max(ns) > 1:
            ax.fill_between(xs, 100 * (mu - sd), 100 * (mu + sd), color=f"C{i}", alpha=0.15)
    for j, arm in enumerate(a for a in ("cloud_only", "backprop") if a in recs):
        v = np.mean([final(r, key) for r in recs[arm]])
        ax.axhline(100 * v, ls="--", color=f"C{5 + j}", label=f"{NAMES[arm]}: {100 * v:.1f}")
    ax.set_xlabel({"forward_passes": "edge forward passes (all clients)", "train_s": "wall time, s (2 cores)"}[xkey])
    ax.set_ylabel(("calibrated" if key == "acc_calibrated" else "raw") + " test accuracy, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    p = out / f"{name}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def markdown(recs: dict, cfg: dict, rss: dict, images: list[str]) -> str:
    s = summary(recs)
    head = ["# Round v2 study: tweets (private) × movie snippets (public), SmolLM2-135M Q4_0", "",
            "Generated by `bench/convergence_report.py` from the JSON in `docs/bench/study/` (written by "
            "`bench/convergence.py`). Accuracy on the held-out balanced private test set; *calibrated* uses the "
            "threshold fitted on the private validation split (never on test). Mean ± sd over seeds.", "",
            f"Setup: {cfg.get('clients', 4)} clients, Dirichlet {cfg.get('dirichlet', 0.5)} label skew, "
            f"{cfg.get('shard', '?')} tweets each, test {cfg.get('test_n', '?')}, val {cfg.get('val_n', '?')}, "
            f"batch {cfg.get('batch', '?')}, {cfg.get('local_steps', '?')} local steps per round "
            f"(200 edge forwards per round), k = {cfg.get('k', '?')}.", "",
            "| arm | raw @600 | cal @600 | raw @2000 | cal @2000 | train s |", "|---|---|---|---|---|---|"]
    rows = []
    for arm in NAMES:
        if arm not in s:
            continue
        r = s[arm]
        if arm in ZO:
            rows.append(f"| {NAMES[arm]} | {fmt(r['acc@600'])} | {fmt(r['acc_calibrated@600'])} | "
                        f"{fmt(r['acc@2000'])} | {fmt(r['acc_calibrated@2000'])} | {r['train_s']:.0f} |")
        else:
            rows.append(f"| {NAMES[arm]} | final {fmt(r['acc@final'])} | final {fmt(r['acc_calibrated@final'])} "
                        f"| | | {r['train_s']:.0f} |")
    zs = next((s[a]["acc_calibrated@0"] for a in ("mezo", "backprop", "guided", "fedkseed") if a in s), None)
    zr = next((s[a]["acc@0"] for a in ("mezo", "backprop", "guided", "fedkseed") if a in s), None)
    tail = ["", f"Zero-shot (θ_init): raw {fmt(zr)}, calibrated {fmt(zs)}.", "",
            "## Targets (calibrated accuracy; means over the seeds that reached the budget)", "",
            "| target | measured | |", "|---|---|---|",
            *(ln for arm in D_ARMS if arm in s for b in (2000, 600) for ln in targets(s, recs, b, arm)), ""]
    if rss:
        tail += [f"Edge peak RSS (subspace ZO on Q4_0, its own process): {rss['train_peak_rss_mb']:.0f} MB "
                 f"(inference {rss['infer_peak_rss_mb']:.0f} MB); torch LoRA backprop on the same model: "
                 f"{rss['backprop_peak_rss_mb']:.0f} MB → **{100 * rss['edge_over_backprop']:.1f}%** "
                 f"(target ≤ 12%: {'met' if rss['edge_over_backprop'] <= 0.12 else '**missed**'}).", ""]
    if "edgezo" in s and "bytes" in s["edgezo"]:
        b = s["edgezo"]["bytes"]
        tail += [f"Bytes per round per client, edgezo: down {b['down_per_client'] / 1e6:.2f} MB (θ fp32 + U q8), "
                 f"up {b['up_per_client']:.0f} B ((seed, g) records), as the study counts them: θ dense every "
                 "round. The guide daemon now sends θ as the merge's c-space move when the edge holds the previous "
                 "round (k float64s): see docs/bench/wire_bytes.json.", ""]
    tail += ["## Plots", ""] + [f"![{i}]({i})" for i in images] + [""]
    return "\n".join(head + rows + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="docs/bench/study", help="folder with the study's per-arm JSON")
    ap.add_argument("--out", default="docs", help="where RESULTS.md and the plots go")
    ap.add_argument("--name", default="RESULTS.md")
    args = ap.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    recs, cfg, rss = load(runs)
    if not recs:
        ap.error(f"no study records (*-s<seed>.json) in {runs}")
    images = []
    for key in ("acc_calibrated", "acc"):
        for xkey, tag in (("forward_passes", "forwards"), ("train_s", "time")):
            images.append(plot(recs, out, key, xkey, f"results_{key}_{tag}").name)
    (out / args.name).write_text(markdown(recs, cfg, rss, images))
    print(f"wrote {out / args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
