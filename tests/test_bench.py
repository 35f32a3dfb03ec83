"""`ei2 bench`: spec checks, statistics, resume without redoing jobs, and 2 CPU processes via accelerate."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ei2.bench.report import mean_ci, t_quantile
from ei2.bench.spec import load_spec
from ei2.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SOURCE = "a red square moving right on a gray background"


def _spec(folder: Path, model, video, recipes, seeds, **extra) -> Path:
    spec = {
        "name": "tiny", "model": str(model), "metrics": ["flow", "oracle"],
        "settings": {"frames": 3, "steps": 1, "inference_steps": 2, "guidance_scale": 3.0},
        "recipes": recipes, "seeds": seeds,
        "videos": [{"name": "square", "path": str(video), "source_prompt": SOURCE,
                    "edits": ["a blue square moving right on a gray background",
                              {"kind": "shape", "prompt": "a red circle moving right on a gray background"}]}],
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def _row_frames(out: Path, row: dict):
    """(source, edit) frames of one results.csv row, from its job's frames.npz (the frames that were scored)."""
    import numpy as np

    with np.load(out / "jobs" / f"{row['video']}--{row['recipe']}--s{row['seed']}" / "frames.npz") as data:
        return data["source"], data["edits"][int(row["edit"]) - 1]


def _direct_tex_ali(frames, prompt: str) -> float:
    """Tex-Ali computed here with transformers' CLIPModel: 100 x mean cosine(frame, prompt) (ClipScorer not used)."""
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    folder = REPO / "assets" / "shapes-clip"
    model = CLIPModel.from_pretrained(folder).eval()
    length = model.config.text_config.max_position_embeddings
    ids = CLIPTokenizer.from_pretrained(folder)(prompt, padding="max_length", max_length=length, truncation=True,
                                                return_tensors="pt").input_ids
    pixels = Processor.from_pretrained(folder)(images=list(frames), return_tensors="pt").pixel_values
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image, text.expand_as(image), dim=-1)
    return 100 * cosine.mean().item()


def _oracle_by_hand(frames, prompt: str, source_prompt: str, centres=None) -> dict:
    """The oracle metrics of DESIGN §2/§3 recomputed here from the oracle's per-frame readings (not through
    `ei2.metrics.oracle`): the share of frames showing the prompt's attribute (colour and shape need an object),
    `edit_acc` over the attributes the prompt changes, `flicker` (share of frames off the clip's majority value,
    averaged over the three attributes), `centre_err` (mean pixel distance to the source's centres where an
    object was found)."""
    import numpy as np

    from ei2.shapes.oracle import read_frames
    from ei2.shapes.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES

    def named(text):
        words = text.split()
        background = words[words.index("background") - 1]
        color = next(w for w in words if w in COLOR_NAMES and w != background)
        return {"color": color, "shape": next(w for w in words if w in SHAPES), "background": background}

    r = read_frames(frames)
    values = {"color": np.where(r.found, r.color, -1), "shape": np.where(r.found, r.shape, -1),
              "background": r.background}
    vocab = {"color": COLOR_NAMES, "shape": SHAPES, "background": BACKGROUND_NAMES}
    target, source = named(prompt), named(source_prompt)
    out = {f"acc_{a}": sum(int(v) == vocab[a].index(target[a]) for v in values[a]) / len(frames) for a in vocab}
    changed = [a for a in vocab if target[a] != source[a]]
    out["edit_acc"] = sum(out[f"acc_{a}"] for a in changed) / len(changed)
    out["flicker"] = sum(1 - max(list(values[a]).count(v) for v in set(values[a])) / len(frames) for a in vocab) / 3
    if centres is not None:
        dist = [((x - cx) ** 2 + (y - cy) ** 2) ** 0.5 for x, y, (cx, cy), ok in zip(r.cx, r.cy, centres, r.found) if ok]
        out["centre_err"] = sum(dist) / len(dist) if dist else float("nan")
    return out


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for log in sorted((out / "logs").glob("*.jsonl")) for line in log.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- spec
def test_spec_jobs_quick_subset_and_edit_kinds(tmp_path, source_video):
    recipes = ["ei2", "tune-a-video", {"name": "untuned", "recipe": "ei2", "steps": 0}]
    section = {"recipes": ["ei2", "untuned"], "seeds": [0], "settings": {"steps": 0}}
    path = _spec(tmp_path, "model", source_video, recipes, [0, 1, 2], quick=section)
    spec = load_spec(path)
    assert len(spec.jobs()) == 3 * 3
    assert [e.kind for e in spec.videos[0].edits] == ["color", "shape"]
    untuned = [j for j in spec.jobs() if j.recipe.name == "untuned"][0]
    assert untuned.settings["steps"] == 0 and untuned.recipe.recipe == "ei2"
    quick = load_spec(path, quick=True)
    assert quick.name == "tiny-quick" and [j.id for j in quick.jobs()] == ["square--ei2--s0", "square--untuned--s0"]
    assert quick.settings["steps"] == 0 and spec.settings["steps"] == 1


def test_spec_settings_left_out_are_the_edit_defaults_of_the_model(tmp_path, source_video):
    """One home for each default: a setting the spec leaves out is what `ei2 edit` uses for that model (the
    generic default, or the model's ei2_defaults.json); `defaults: edit` runs a column exactly as `ei2 edit`."""
    from ei2 import defaults

    model = tmp_path / "model"
    model.mkdir()
    (model / "ei2_defaults.json").write_text(json.dumps({"steps": 7, "strength": 0.5, "inject_features": 0.25}))
    recipes = ["ei2", {"name": "as-edit", "recipe": "tune-a-video", "defaults": "edit"},
               {"name": "as-edit-plain", "recipe": "ei2", "defaults": "edit", "inject_features": 0.0},
               {"name": "p2p", "recipe": "ei2", "p2p": "replace"},
               {"name": "p2p-strength", "recipe": "ei2", "p2p": "replace", "strength": 0.8}]
    path = _spec(tmp_path, model, source_video, recipes, [0])
    data = yaml.safe_load(path.read_text())
    data["settings"] = {"frames": 3, "steps": 1}
    path.write_text(yaml.safe_dump(data))
    jobs = {j.recipe.name: j.settings for j in load_spec(path).jobs()}
    spec_column, as_edit, plain = jobs["ei2"], jobs["as-edit"], jobs["as-edit-plain"]
    # with --p2p, `ei2 edit` does not take the model's injection and strength unless given (config.PLAIN_EDIT_ONLY)
    assert (jobs["p2p"]["strength"], jobs["p2p"]["inject_features"]) == (defaults.STRENGTH, defaults.INJECT_FEATURES)
    assert jobs["p2p"]["steps"] == 1 and jobs["p2p-strength"]["strength"] == 0.8
    # the spec's own settings win; the rest come from the model's file, then ei2.defaults
    assert (spec_column["steps"], spec_column["frames"]) == (1, 3)
    assert (spec_column["strength"], spec_column["inject_features"]) == (0.5, 0.25)
    assert spec_column["lr"] == defaults.LEARNING_RATE and spec_column["guidance_scale"] == defaults.GUIDANCE_SCALE
    assert spec_column["inference_steps"] == defaults.INFERENCE_STEPS
    assert spec_column["inject_attention"] == defaults.INJECT_ATTENTION
    # `defaults: edit`: the model's steps, not the spec's, on the spec's frames; its own overrides still apply
    assert (as_edit["steps"], as_edit["frames"], as_edit["strength"], as_edit["inject_features"]) == (7, 3, 0.5, 0.25)
    assert (plain["steps"], plain["inject_features"]) == (7, 0.0)
    # the job's config holds the resolved values: another ei2_defaults.json is another benchmark
    digest = load_spec(path).digest()
    (model / "ei2_defaults.json").write_text(json.dumps({"steps": 8}))
    assert load_spec(path).digest() != digest
    assert {j.recipe.name: j.settings["steps"] for j in load_spec(path).jobs()}["as-edit"] == 8
    data["recipes"] = [{"name": "x", "recipe": "ei2", "defaults": "cli"}]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="'defaults' can only be 'edit'"):
        load_spec(path)


@pytest.mark.parametrize("p2p", [False, True])
def test_bench_job_settings_are_the_cli_settings(tmp_path, source_video, p2p):
    """The settings object a bench job edits with is the one `ei2 edit` resolves from the same command line."""
    from ei2 import config as cfg
    from ei2.bench.run import job_settings
    from ei2.cli import build_parser

    model = tmp_path / "model"
    model.mkdir()
    (model / "ei2_defaults.json").write_text(json.dumps({"steps": 7, "strength": 0.5, "guidance_scale": 4.0}))
    path = _spec(tmp_path, model, source_video, ["ei2"], [3])
    data = yaml.safe_load(path.read_text())
    data["settings"] = {"frames": 3, "inference_steps": 2}
    if p2p:
        data["settings"].update(p2p="replace", cross_replace=0.6, self_replace=0.3)
    path.write_text(yaml.safe_dump(data))
    [job] = load_spec(path).jobs()
    prompts = [e.prompt for e in job.video.edits]
    bench = job_settings(job, prompts)
    argv = ["edit", str(source_video), "--model", str(model), "--source-prompt", SOURCE, "--frames", "3",
            "--inference-steps", "2", "--seed", "3", "--quiet"] + [a for p in prompts for a in ("--target-prompt", p)]
    if p2p:
        argv += ["--p2p", "replace", "--cross-replace", "0.6", "--self-replace", "0.3"]
    args = build_parser().parse_args(argv)
    cli = cfg.resolve("edit", args, None)
    cfg.apply_model_defaults(cli, model, "edit")
    for field in cfg.fields_for("edit"):
        if field.name not in ("video", "model"):
            assert getattr(bench, field.name) == getattr(cli, field.name), field.name


def test_bench_seeds_and_recipes_flags_select_jobs(tmp_path, source_video, monkeypatch, capsys):
    from ei2.bench import run as bench_run
    from ei2.cli import main

    path = _spec(tmp_path, "model", source_video, ["ei2", "tune-a-video"], [0, 1, 2])
    ran = []
    monkeypatch.setattr(bench_run, "run_bench", lambda spec, out, **kw: ran.append([j.id for j in spec.jobs()]) or {})
    assert main(["bench", str(path), "--out", str(tmp_path / "out"), "--seeds", "2", "0", "--recipes",
                 "tune-a-video", "--quiet"]) == 0
    assert ran == [["square--tune-a-video--s0", "square--tune-a-video--s2"]]
    assert main(["bench", str(path), "--out", str(tmp_path / "out"), "--seeds", "7", "--quiet"]) != 0
    assert "--seeds 7: not in the spec; its seeds are 0, 1, 2" in capsys.readouterr().err
    assert len(ran) == 1


@pytest.mark.parametrize("change, message", [
    ({"recipe": ["ei2"]}, "unknown key 'recipe' \\(did you mean 'recipes'\\?\\)"),
    ({"recipes": ["ei3"]}, "unknown recipe 'ei3'"),
    ({"seeds": ["zero"]}, "'seeds' must be a list of integers"),
    ({"settings": {"step": 3}}, "did you mean 'steps'"),
    ({"settings": {"steps": "many"}}, "'steps' must be int"),
    ({"metrics": ["fid"]}, "'metrics' must be a list of clip, oracle, flow"),
])
def test_spec_errors_name_the_key(tmp_path, source_video, change, message):
    path = _spec(tmp_path, "model", source_video, ["ei2"], [0])
    data = yaml.safe_load(path.read_text())
    data.pop("recipes") if "recipe" in change else None
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


def test_spec_video_needs_path_or_shapes(tmp_path, source_video):
    path = _spec(tmp_path, "model", source_video, ["ei2"], [0])
    data = yaml.safe_load(path.read_text())
    data["videos"][0]["shapes"] = {"motion": "right", "color": "red", "shape": "square", "background": "gray"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="either 'path'"):
        load_spec(path)
    del data["videos"][0]["path"]
    data["videos"][0]["shapes"]["motion"] = "sideways"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="motion 'sideways' is not one of"):
        load_spec(path)


def test_shapes_benchmark_spec_is_valid():
    spec = load_spec(REPO / "benchmarks" / "shapes" / "spec.yaml")
    assert len(spec.videos) >= 12 and len(spec.seeds) == 3
    assert len({v.shapes["motion"] for v in spec.videos}) >= 6
    assert {r.recipe for r in spec.recipes} >= {"ei2", "ei2-after-cross", "tune-a-video", "tune-a-video+stam", "ei2-ta"}
    assert any(r.overrides.get("steps") == 0 for r in spec.recipes)  # the untuned inflated model
    for video in spec.videos:
        assert sorted(e.kind for e in video.edits) == ["background", "color", "shape"]
    assert len(load_spec(REPO / "benchmarks" / "shapes" / "spec.yaml", quick=True).jobs()) < len(spec.jobs())


# ---------------------------------------------------------------------------------------------- statistics
def test_t_quantile_and_interval():
    for df, t in ((1, 12.706), (4, 2.776), (10, 2.228), (30, 2.042), (1000, 1.962)):
        assert t_quantile(df) == pytest.approx(t, abs=4e-3)
    mean, half, n = mean_ci([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 * 1.0 / 3 ** 0.5, abs=1e-3)


# ---------------------------------------------------------------------------------------------- running
def test_bench_runs_resumes_and_refuses_other_settings(tmp_path, tiny_sd, source_video):
    from ei2.bench.run import run_bench

    path = _spec(tmp_path, tiny_sd, source_video, ["ei2", {"name": "untuned", "recipe": "ei2", "steps": 0}], [0])
    out = tmp_path / "out"
    assert run_bench(load_spec(path), out, device="cpu", threads=1)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 and {r["recipe"] for r in rows} == {"ei2", "untuned"}
    assert {r["kind"] for r in rows} == {"color", "shape"}
    for row in rows:  # the oracle's scores are those of the job's saved frames, recomputed here
        _, edit = _row_frames(out, row)
        want = _oracle_by_hand(edit, row["prompt"], SOURCE)
        for key in ("acc_color", "acc_shape", "acc_background", "edit_acc", "flicker"):
            assert float(row[key]) == pytest.approx(want[key], abs=1e-6), (key, row)
    from ei2.metrics.flow import warp_error

    for row in rows:  # the warp errors are those of the job's saved frames, with the source's flow for WarpSrc
        source, edit = _row_frames(out, row)
        assert float(row["warp_err"]) == pytest.approx(warp_error(edit), rel=1e-4, abs=1e-4)
        assert float(row["warp_err_src"]) == pytest.approx(warp_error(edit, source), rel=1e-4, abs=1e-4)
    report = (out / "report.md").read_text()
    assert "| ei2 | 2 |" in report and "tuned vs untuned" in report
    html = (out / "report.html").read_text()
    assert "jobs/square--untuned--s0/edits/01-color.gif" in html
    assert (out / "jobs/square--ei2--s0/edits/02-shape.gif").is_file()
    assert (out / "plots" / "warp_err.png").is_file()
    # the same command again: nothing is redone
    done = (out / "jobs/square--ei2--s0/job.json").stat().st_mtime_ns
    assert run_bench(load_spec(path), out, device="cpu", threads=1)
    assert len([e for e in _events(out) if e["event"] == "start"]) == 2
    assert (out / "jobs/square--ei2--s0/job.json").stat().st_mtime_ns == done
    # metrics recomputed from the saved frames, without running the jobs again
    from ei2.cli import main

    assert main(["bench", str(path), "--out", str(out), "--rescore", "--metrics", "flow", "--quiet"]) == 0
    record = json.loads((out / "jobs/square--ei2--s0/job.json").read_text())
    assert set(record["edits"][0]["metrics"]) == {"warp_err", "warp_err_src"}
    assert len([e for e in _events(out) if e["event"] == "start"]) == 2
    # other settings in the same folder are refused, not mixed in
    changed = _spec(tmp_path / "other", tiny_sd, source_video, ["ei2"], [0])
    data = yaml.safe_load(changed.read_text())
    data["settings"]["steps"] = 2
    changed.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="other settings"):
        run_bench(load_spec(changed), out, device="cpu", threads=1)


def test_bench_with_two_accelerate_processes_runs_each_job_once(tmp_path, tiny_sd, source_video):
    path = _spec(tmp_path, tiny_sd, source_video, ["ei2", "tune-a-video"], [0, 1])
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "ei2", "bench", str(path), "--out", str(out), "--threads", "1", "--quiet"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    done = [e for e in _events(out) if e["event"] == "done"]
    jobs = [j.id for j in load_spec(path).jobs()]
    assert sorted(e["job"] for e in done) == sorted(jobs)  # every job exactly once
    assert {e["rank"] for e in done} == {0, 1}  # shared between the two processes
    assert len({e["pid"] for e in done}) == 2
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(jobs) * 2


# ---------------------------------------------------------------------------------------------- smoke test


@pytest.mark.skipif(not (REPO / "assets" / "shapes-sd" / "model_index.json").is_file(),
                    reason="the bundled Shapes model is not in this checkout")
def test_shapes_benchmark_quick_subset_runs_end_to_end(tmp_path, capsys):
    """The committed Shapes spec, `--quick` (2 videos x 3 recipes x 1 seed, ~2 min on 2 cores), as a user runs it."""
    from ei2.cli import main

    spec_path = REPO / "benchmarks" / "shapes" / "spec.yaml"
    quick = load_spec(spec_path, quick=True)
    out = tmp_path / "quick"
    assert main(["bench", str(spec_path), "--quick", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    edits = sum(len(v.edits) for v in quick.videos) * len(quick.recipes) * len(quick.seeds)
    assert len(rows) == edits == len(quick.jobs()) * 3
    assert {r["recipe"] for r in rows} == {r.name for r in quick.recipes}
    jobs = {j.id: j for j in quick.jobs()}
    for row in rows:  # the oracle's scores, recomputed here from the saved frames and the renderer's centres
        source, edit = _row_frames(out, row)
        job = jobs[f"{row['video']}--{row['recipe']}--s{row['seed']}"]
        _, centres, _ = job.video.load(job.settings, source.shape[1])
        want = _oracle_by_hand(edit, row["prompt"], job.video.source_prompt, centres)
        for key in ("acc_color", "acc_shape", "acc_background", "edit_acc", "flicker", "centre_err"):
            assert float(row[key]) == pytest.approx(want[key], abs=1e-4, nan_ok=True), (key, row)
    from ei2.metrics.flow import warp_error

    for row in rows[:2]:  # Tex-Ali against a CLIP cosine computed here; the warp error of the saved frames
        _, edit = _row_frames(out, row)
        assert float(row["tex_ali"]) == pytest.approx(_direct_tex_ali(edit, row["prompt"]), abs=1e-3)
        assert float(row["warp_err"]) == pytest.approx(warp_error(edit), rel=1e-4, abs=1e-4)
    # a colour edit is the easiest: the Shapes model gets the asked colour in most frames with every recipe
    colour = [float(r["acc_color"]) for r in rows if r["kind"] == "color"]
    assert sum(colour) / len(colour) >= 0.75, colour
    report = (out / "report.md").read_text()
    assert all(f"| {r.name} |" in report for r in quick.recipes)
    assert (out / "report.html").is_file()
