"""Reports of a finished benchmark: results.csv, report.md (mean ± 95% interval per recipe), report.html.

The interval is mean ± t_{0.975, n-1} · s / √n over the n edits of a recipe (videos × edits × seeds),
treating edits as independent; the paired table compares each recipe with the baseline on the same
(video, seed, edit), which removes the spread between videos.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from ..files import atomic_path
from ..metrics.evaluate import COLUMNS
from .spec import BenchSpec, Job

LOWER_IS_BETTER = {"warp_err", "warp_err_src", "centre_err", "flicker", "collapsed"}
BASELINE = "tune-a-video"
PLOTTED = ("tex_ali", "tem_con", "frame_acc", "edit_acc", "keep_acc", "centre_err", "flicker", "warp_err")


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """97.5% quantile of Student's t with df degrees of freedom (table to 30, Cornish-Fisher beyond)."""
    if df <= 0:
        return float("nan")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% interval, n) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    if v.size == 1:
        return float(v[0]), float("nan"), 1
    return float(v.mean()), float(t_quantile(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)), int(v.size)


def collect(out: Path, jobs: list[Job]) -> list[dict]:
    """One row per (job, edit): identifiers, timings and metrics."""
    rows = []
    for job in jobs:
        record = json.loads((out / "jobs" / job.id / "job.json").read_text())
        for e in record["edits"]:
            rows.append({
                "video": job.video.name, "recipe": job.recipe.name, "seed": job.seed, "edit": e["index"],
                "kind": e["kind"], "prompt": e["prompt"], **e["metrics"],
                "tune_s": record["timings"].get("tune_s", 0.0), "edit_s": record["timings"]["edit_s"],
                "job_s": record["timings"]["total_s"], "cpu_s": record["timings"].get("cpu_s"),
                "last_loss": record["tuning"]["mean_last_10"],
                "gif": f"jobs/{job.id}/{e['gif']}", "source_gif": f"jobs/{job.id}/source.gif",
            })
    return rows


def metric_keys(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k in r}
    return [k for k in COLUMNS if k in present]


def _fmt(key: str, mean: float, half: float) -> str:
    if not np.isfinite(mean):
        return "–"
    f = COLUMNS[key][1] if key in COLUMNS else "{:.3f}"
    return f.format(mean) + ("" if not np.isfinite(half) else " ± " + f.format(half))


def _arrow(key: str) -> str:
    return "↓" if key in LOWER_IS_BETTER else "↑"


def recipe_table(rows: list[dict], recipes: list[str], keys: list[str]) -> str:
    head = "| recipe | n | " + " | ".join(f"{COLUMNS[k][0]} {_arrow(k)}" for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for r in recipes:
        sub = [x for x in rows if x["recipe"] == r]
        cells = [_fmt(k, *mean_ci([x.get(k) for x in sub])[:2]) for k in keys]
        lines.append(f"| {r} | {len(sub)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kind_table(rows: list[dict], recipes: list[str], key: str) -> str:
    kinds = list(dict.fromkeys(x["kind"] for x in rows))
    lines = ["| recipe | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for r in recipes:
        cells = [_fmt(key, *mean_ci([x.get(key) for x in rows if x["recipe"] == r and x["kind"] == k])[:2])
                 for k in kinds]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ABLATIONS = (  # (question, recipe a, recipe b): each row of the ablation table is a - b on matched edits
    ("STAM vs TA, with FFAM", "ei2", "ei2-ta"),
    ("STAM vs TA, with sparse-causal", "tune-a-video+stam", "tune-a-video"),
    ("FFAM vs sparse-causal, with STAM", "ei2", "tune-a-video+stam"),
    ("FFAM vs sparse-causal, with TA", "ei2-ta", "tune-a-video"),
    ("STAM after self- vs after cross-attention", "ei2", "ei2-after-cross"),
    ("EI² vs Tune-A-Video", "ei2", "tune-a-video"),
    ("tuned vs untuned", "ei2", "untuned"),
    ("injection on vs off, EI²", "ei2+inject", "ei2"),
    ("injection on vs off, Tune-A-Video", "tune-a-video+inject", "tune-a-video"),
    ("injection on vs off, EI² at the Shapes defaults", "ei2-shapes-defaults+inject", "ei2-shapes-defaults"),
    ("EI² vs Tune-A-Video, as `ei2 edit` runs them", "ei2-edit-defaults", "tune-a-video-edit-defaults"),
)


def _paired_cells(rows: list[dict], a: str, b: str, keys: list[str]) -> tuple[int, list[str]]:
    """n matched (video, seed, edit) and, per metric, mean(a - b) ± 95% interval (* when it excludes 0)."""
    base = {(x["video"], x["seed"], x["edit"]): x for x in rows if x["recipe"] == b}
    pairs = [(x, base[(x["video"], x["seed"], x["edit"])]) for x in rows
             if x["recipe"] == a and (x["video"], x["seed"], x["edit"]) in base]
    cells = []
    for k in keys:
        diffs = [p[k] - q[k] for p, q in pairs if p.get(k) is not None and q.get(k) is not None]
        m, h, _ = mean_ci(diffs)
        sig = " *" if np.isfinite(h) and abs(m) > h else ""
        cells.append(("+" if np.isfinite(m) and m > 0 else "") + _fmt(k, m, h) + sig)
    return len(pairs), cells


def paired_table(rows: list[dict], comparisons: list[tuple[str, str, str]], keys: list[str]) -> str:
    """Mean difference a − b over matched (video, seed, edit), with its 95% interval."""
    lines = ["| comparison | a − b | n | " + " | ".join(f"Δ {COLUMNS[k][0]} {_arrow(k)}" for k in keys) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for label, a, b in comparisons:
        n, cells = _paired_cells(rows, a, b, keys)
        if n:
            lines.append(f"| {label} | {a} − {b} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _timing(out: Path, rows: list[dict]) -> dict:
    """Compute time (sum of job times) and wall time (first start to last done in the logs)."""
    events = []
    for log in sorted((out / "logs").glob("process-*.jsonl")):
        events += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    seen, compute = set(), 0.0
    for r in rows:
        key = (r["video"], r["recipe"], r["seed"])
        if key not in seen:
            seen.add(key)
            compute += r["job_s"]
    starts = [e["time"] for e in events if e["event"] == "start"]
    dones = [e["time"] for e in events if e["event"] == "done"]
    wall = (max(dones) - min(starts)) if starts and dones else float("nan")
    processes = len({e["rank"] for e in events}) or 1
    return {"compute_s": compute, "wall_s": wall, "processes": processes, "jobs": len(seen)}


def markdown(spec: BenchSpec, rows: list[dict], timing: dict) -> str:
    recipes = [r.name for r in spec.recipes]
    keys = metric_keys(rows)
    s = spec.settings
    out = [
        f"# Benchmark `{spec.name}`",
        "",
        f"{len(spec.videos)} videos × {len(recipes)} recipes × {len(spec.seeds)} seeds = {len(spec.jobs())} jobs "
        f"(one tuning and {len(spec.videos[0].edits)} edits each). Settings (the variants' own below): {s['frames']} frames, {s['steps']} tuning steps (lr {s['lr']:g}), "
        f"{s['inference_steps']} DDIM steps, guidance {s['guidance_scale']:g}. "
        f"Compute {timing['compute_s'] / 60:.1f} min in {timing['jobs']} finished jobs; wall {timing['wall_s'] / 60:.1f} min on "
        f"{timing['processes']} process(es).",
        "",
        "Mean ± 95% interval over edits (videos × edits × seeds). ↑ higher is better, ↓ lower is better.",
        "Tex-Ali: 100 × CLIP cos(frame, target); Tem-Con: CLIP cos of consecutive frames; FrameAcc: share of frames "
        "nearer the target than the source prompt; EditAcc/KeepAcc: oracle share of frames with the edited / kept "
        "attributes; CentreErr: px from the source trajectory; Flicker: share of frames off the clip's majority "
        "attribute; Warp: warp error (0–255) with the edit's own Farnebäck flow, WarpSrc with the source's flow.",
        "",
        "## Per recipe",
        "",
        recipe_table(rows, recipes, keys),
    ]
    def differs(r) -> str:  # the column's settings that are not the spec's (above), with their values
        own = spec.job_settings(r)
        return ", ".join(f"{k} {own[k]:g}" if isinstance(own[k], float) else f"{k} {own[k]}"
                         for k in own if own[k] != s.get(k))

    overrides = [f"`{r.name}` = `{r.recipe}`" + (" as `ei2 edit` runs it" if r.edit_defaults else "")
                 + (f" ({differs(r)})" if differs(r) else "") for r in spec.recipes if r.overrides or r.edit_defaults]
    if overrides:
        out += ["", "Variants: " + "; ".join(overrides) + "."]
    if "edit_acc" in keys:
        out += ["", "## Edit accuracy by kind of edit", "", kind_table(rows, recipes, "edit_acc")]
    if "path_kept" in keys:
        out += ["", "## Path kept (mean centre error ≤ 4 px, an object in every frame) by kind of edit", "",
                kind_table(rows, recipes, "path_kept")]
    comparisons = [c for c in ABLATIONS if c[1] in recipes and c[2] in recipes]
    if comparisons:
        out += ["", "## Ablations: paired differences", "",
                "a − b on the same video, seed and edit; * marks a 95% interval that excludes 0.", "",
                paired_table(rows, comparisons, keys)]
    baseline = BASELINE if BASELINE in recipes else recipes[0]
    others = [(f"against {baseline}", r, baseline) for r in recipes if r != baseline]
    if others:
        out += ["", f"## Every recipe against `{baseline}`", "", paired_table(rows, others, keys)]
    out += ["", "## Time per job (s)", "", "Wall-clock means; CPU: the process's CPU time (all threads), when recorded.",
            "", "| recipe | tuning | inversion + edits | job | CPU |", "|---|---|---|---|---|"]
    for r in recipes:
        sub = list({(x["video"], x["seed"]): x for x in rows if x["recipe"] == r}.values())
        cpu = [x["cpu_s"] for x in sub if x.get("cpu_s") is not None]
        cpu_cell = f"{np.mean(cpu):.1f}" if cpu else "–"
        out.append(f"| {r} | {np.mean([x['tune_s'] for x in sub]):.1f} | {np.mean([x['edit_s'] for x in sub]):.1f} | "
                   f"{np.mean([x['job_s'] for x in sub]):.1f} | {cpu_cell} |")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], recipes: list[str], folder: Path) -> list[str]:
    """One PNG per metric: mean ± 95% interval per recipe. Returns the file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for key in [k for k in PLOTTED if any(k in r for r in rows)]:
        stats = [mean_ci([x.get(key) for x in rows if x["recipe"] == r]) for r in recipes]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(recipes), 3.0), dpi=100)
        means = [m for m, _, _ in stats]
        errs = [h if np.isfinite(h) else 0 for _, h, _ in stats]
        ax.bar(range(len(recipes)), means, yerr=errs, capsize=4, color="#4c78a8")
        ax.set_xticks(range(len(recipes)), recipes, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{COLUMNS[key][0]} {_arrow(key)}", fontsize=10)
        finite = [m for m in means if np.isfinite(m)]
        if finite and key in ("tem_con",):
            lo = min(m - e for m, e in zip(means, errs) if np.isfinite(m))
            ax.set_ylim(max(0.0, lo - 0.01), min(1.0, max(finite) + 0.01) + 0.001)
        fig.tight_layout()
        name = f"{key}.png"
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        names.append(name)
    return names


def html_report(spec: BenchSpec, rows: list[dict], md: str, plot_names: list[str]) -> str:
    recipes = [r.name for r in spec.recipes]
    seed = spec.seeds[0]
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ei2 benchmark {e(spec.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px;text-align:center;font-size:12px}"
        "img.v{width:128px;image-rendering:pixelated}pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style>",
        "</head><body>",
        f"<h1>ei2 benchmark <code>{e(spec.name)}</code></h1>",
        "<h2>Plots</h2><div>",
        *[f"<img src='plots/{e(n)}' alt='{e(n)}'>" for n in plot_names],
        "</div>",
        f"<h2>Gallery (seed {seed})</h2>",
    ]
    for video in spec.videos:
        vrows = [x for x in rows if x["video"] == video.name and x["seed"] == seed]
        if not vrows:
            continue
        parts.append(f"<h3>{e(video.name)}</h3><table><tr><th>recipe</th><th>source<br><small>{e(video.source_prompt)}"
                     "</small></th>")
        parts += [f"<th>{e(ed.kind)}<br><small>{e(ed.prompt)}</small></th>" for ed in video.edits]
        parts.append("</tr>")
        for r in recipes:
            cells = sorted((x for x in vrows if x["recipe"] == r), key=lambda x: x["edit"])
            if not cells:
                continue
            parts.append(f"<tr><th>{e(r)}</th><td><img class='v' src='{e(cells[0]['source_gif'])}'></td>")
            for x in cells:
                score = " ".join(f"{COLUMNS[k][0]} {COLUMNS[k][1].format(x[k])}" for k in ("tex_ali", "edit_acc")
                                 if k in x and x[k] is not None and np.isfinite(x[k]))
                parts.append(f"<td><img class='v' src='{e(x['gif'])}'><br><small>{e(score)}</small></td>")
            parts.append("</tr>")
        parts.append("</table>")
    parts += ["<h2>Tables</h2>", f"<pre>{e(md)}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(spec: BenchSpec, out: Path, jobs: list[Job]) -> None:
    """Reports over the finished jobs among `jobs`; tables use the (video, seed) groups every recipe finished."""
    finished = [j for j in jobs if (out / "jobs" / j.id / "job.json").is_file()]
    rows = collect(out, finished)
    write_csv(rows, out / "results.csv")
    groups: dict = {}
    for j in finished:
        groups.setdefault((j.video.name, j.seed), set()).add(j.recipe.name)
    complete = {g for g, names in groups.items() if len(names) == len(spec.recipes)}
    table_rows = [r for r in rows if (r["video"], r["seed"]) in complete]
    md = markdown(spec, table_rows, _timing(out, rows))
    if len(finished) < len(jobs):
        note = (f"**Partial: {len(finished)} of {len(jobs)} jobs finished; the tables use the {len(complete)} "
                f"(video, seed) pairs that every recipe finished ({len(table_rows)} edits).**\n\n")
        head, _, rest = md.partition("\n\n")
        md = head + "\n\n" + note + rest
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(md)
    names = plots(table_rows, [r.name for r in spec.recipes], out / "plots")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(html_report(spec, table_rows, md, names))
