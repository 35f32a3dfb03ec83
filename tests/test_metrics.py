"""Metrics against independent references: hand-computed cosines, CLIPModel's own logits, known flows
and rendered Shapes videos whose colours, shapes and positions are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ei2.metrics.clip import (ClipScorer, clip_metrics, frame_accuracy, temporal_consistencies, temporal_consistency,
                              textual_alignment)
from ei2.metrics.flow import optical_flow, warp_error, warp_errors
from ei2.metrics.oracle import flicker, is_shapes_caption, oracle_metrics, parse_caption
from ei2.shapes.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, render, video_scenes

SOURCE = "a red circle moving right on a gray background"


# ---------------------------------------------------------------------------------------------- CLIP
def test_clip_formulas_match_hand_computed_cosines():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # unnormalised on purpose
    assert textual_alignment(images, torch.tensor([1.0, 1.0])) == pytest.approx(100 / math.sqrt(2), abs=1e-4)
    assert temporal_consistency(images) == pytest.approx(0.0, abs=1e-7)  # orthogonal neighbours
    assert temporal_consistency(images[[0, 2, 0]]) == pytest.approx(1.0, abs=1e-7)  # the same direction
    assert frame_accuracy(images, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(2 / 3)
    angle = torch.tensor([[1.0, 0.0], [math.cos(0.3), math.sin(0.3)]])
    assert temporal_consistency(angle) == pytest.approx(math.cos(0.3), abs=1e-6)


def test_per_pair_temporal_consistency_means_to_tem_con():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [math.cos(0.3), math.sin(0.3)]])
    pairs = temporal_consistencies(images)
    assert pairs.shape == (3,)
    assert pairs.tolist() == pytest.approx([0.0, 0.0, math.cos(0.3)], abs=1e-6)  # pair i: frames i, i + 1
    random = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    assert float(temporal_consistencies(random).mean()) == pytest.approx(temporal_consistency(random), abs=1e-7)
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_consistencies(images[:1])

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny transformers CLIPModel folder with a tokenizer and an image processor."""
    from conftest import write_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_clip_scorer_agrees_with_clip_model_logits(tiny_clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    prompts = ["a red square", "a blue circle"]
    scores = clip_metrics(frames, prompts[0], prompts[1], ClipScorer(tiny_clip))
    # reference: CLIPModel's forward, logits_per_image = exp(logit_scale) * cos(image, text)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip)
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip)(images=list(frames), return_tensors="pt").pixel_values
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cos = model(input_ids=ids, pixel_values=pixels).logits_per_image / model.logit_scale.exp()  # (3, 2)
    assert scores["tex_ali"] == pytest.approx(100 * cos[:, 0].mean().item(), abs=1e-3)
    assert scores["frame_acc"] == pytest.approx((cos[:, 0] > cos[:, 1]).float().mean().item())


def test_still_video_has_temporal_consistency_one(tiny_clip):
    frame = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scores = clip_metrics(np.stack([frame] * 4), "a red square", scorer=ClipScorer(tiny_clip))
    assert scores["tem_con"] == pytest.approx(1.0, abs=1e-5)
    assert "frame_acc" not in scores


def test_clip_scorer_missing_model_says_what_to_pass(tmp_path):
    from ei2.errors import ModelError

    with pytest.raises(ModelError, match="--clip-model"):
        ClipScorer(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- flow
def _texture(seed=0, size=80):
    import cv2

    noise = np.random.default_rng(seed).random((size, size, 3)).astype(np.float32) * 255
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return np.clip((smooth - smooth.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def test_warp_error_small_for_a_shift_large_for_another_frame():
    base = _texture()
    a, b = base[8:72, 8:72], base[8:72, 6:70]  # b(x) = a(x - 2): the content moves 2 px right
    flow = optical_flow(b, a)  # b(p) ~ a(p + flow): dx = -2
    assert flow[16:48, 16:48, 0].mean() == pytest.approx(-2.0, abs=0.1)
    assert abs(flow[16:48, 16:48, 1].mean()) < 0.1
    shifted = warp_error(np.stack([a, b]))
    other = warp_error(np.stack([a, _texture(seed=1)[:64, :64]]))
    still = warp_error(np.stack([a, a, a]))
    plain_difference = np.abs(a.astype(float) - b.astype(float)).mean()
    assert still < 0.5 and shifted < 1.0
    assert other > 15 and plain_difference > 10 * shifted


def test_warp_error_with_source_flow():
    video = render(video_scenes("right", 6, seed=0))
    assert warp_error(video, video) < 1.0
    with pytest.raises(ValueError, match="same shape"):
        warp_error(video, video[:3])


def test_per_pair_warp_errors_mean_to_the_warp_error():
    source = render(video_scenes("right", 6, seed=0))
    video = source.copy()
    video[3] = render(video_scenes("right", 6, color=COLOR_NAMES.index("blue"), seed=0))[3]  # frame 3 turns blue
    pairs = warp_errors(video)  # pair i: frames i, i + 1
    assert pairs.shape == (5,) and np.isfinite(pairs).all()
    assert float(pairs.mean()) == pytest.approx(warp_error(video), rel=1e-6)
    assert min(pairs[2], pairs[3]) > 5 * max(pairs[0], pairs[1], pairs[4])  # only 2|3 and 3|4 change colour
    assert float(warp_errors(video, source).mean()) == pytest.approx(warp_error(video, source), rel=1e-6)

# ---------------------------------------------------------------------------------------------- oracle
def _scenes(color="red", shape="circle", background="gray", motion="right", frames=8):
    return video_scenes(motion, frames, COLOR_NAMES.index(color), SHAPES.index(shape),
                        BACKGROUND_NAMES.index(background), seed=3)


def test_parse_caption():
    assert parse_caption(SOURCE) == {"color": "red", "shape": "circle", "background": "gray"}
    assert parse_caption("a blue square on a white background") == {"color": "blue", "shape": "square",
                                                                     "background": "white"}
    assert parse_caption("a man is skiing") == {"color": None, "shape": None, "background": None}
    assert is_shapes_caption(SOURCE) and not is_shapes_caption("a purple triangle")


def test_oracle_metrics_on_rendered_videos_with_known_answers():
    source = _scenes()
    centres = np.stack([source.cx, source.cy], 1)
    red = render(source)
    target = "a blue circle moving right on a gray background"
    # the unedited video: colour wrong in every frame, shape and background kept, on the trajectory
    m = oracle_metrics(red, target, source=SOURCE, source_centres=centres)
    assert (m["acc_color"], m["acc_shape"], m["acc_background"], m["acc_all"]) == (0.0, 1.0, 1.0, 0.0)
    assert (m["edit_acc"], m["keep_acc"], m["flicker"], m["found"]) == (0.0, 1.0, 0.0, 1.0)
    assert m["centre_err"] < 1.0
    # a perfect edit, measured against the trajectory read from the source frames
    blue = render(_scenes(color="blue"))
    m = oracle_metrics(blue, target, source=SOURCE, source_frames=red)
    assert (m["edit_acc"], m["keep_acc"], m["acc_all"]) == (1.0, 1.0, 1.0)
    assert m["centre_err"] < 0.5
    # the same edit 5 px lower: the structure is not preserved
    lower = _scenes(color="blue")
    lower.cy = lower.cy + 5
    m = oracle_metrics(render(lower), target, source=SOURCE, source_centres=centres)
    assert m["centre_err"] == pytest.approx(5.0, abs=0.6)
    # 3 of 8 frames keep the old colour: colour flicker 3/8, shape and background 0
    mixed = blue.copy()
    mixed[[1, 4, 6]] = red[[1, 4, 6]]
    m = oracle_metrics(mixed, target, source=SOURCE, source_centres=centres)
    assert m["acc_color"] == pytest.approx(5 / 8)
    assert m["flicker"] == pytest.approx(3 / 8 / 3)


def test_flicker_counts_frames_off_the_majority():
    assert flicker(np.array([2, 2, 2, 2])) == 0.0
    assert flicker(np.array([0, 1, 1, 1, 2])) == pytest.approx(2 / 5)


# ---------------------------------------------------------------------------------------------- ei2 eval
def _write_run(folder, edits: dict[str, np.ndarray], source: np.ndarray):
    """A run folder laid out as `ei2 edit` writes it (run.json, source.gif, edits/*.gif)."""
    from ei2.video import write_gif, write_mp4

    (folder / "edits").mkdir(parents=True)
    write_gif(source, folder / "source.gif")
    write_mp4(source, folder / "source.mp4")
    outputs = []
    for i, (prompt, frames) in enumerate(edits.items(), 1):
        write_gif(frames, folder / "edits" / f"{i:02d}.gif")
        outputs.append({"prompt": prompt, "mp4": f"edits/{i:02d}.mp4", "gif": f"edits/{i:02d}.gif"})
    record = {"command": "edit", "settings": {"source_prompt": SOURCE},
              "outputs": {"edits": outputs, "source": ["source.mp4", "source.gif"]}}
    (folder / "run.json").write_text(json.dumps(record))


def test_eval_adds_metrics_to_run_json(tmp_path, tiny_clip, capsys):
    from ei2.cli import main

    red = render(_scenes())
    blue = render(_scenes(color="blue"))
    _write_run(tmp_path / "run", {"a blue circle moving right on a gray background": blue,
                                  "a red square moving right on a gray background": red}, red)
    assert main(["eval", str(tmp_path / "run"), "--clip-model", str(tiny_clip)]) == 0
    printed = capsys.readouterr().out
    assert "Tex-Ali" in printed and "EditAcc" in printed and "mean" in printed
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["command"] == "edit"  # the rest of the record is kept
    first, second = record["metrics"]["edits"]
    assert first["edit_acc"] == 1.0 and first["centre_err"] < 0.5 and first["warp_err"] < 5
    assert second["edit_acc"] == 0.0 and second["keep_acc"] == 1.0
    assert record["metrics"]["mean"]["edit_acc"] == pytest.approx(0.5)
    assert 0.99 < first["tem_con"] <= 1.0 + 1e-6
    assert record["metrics"]["clip_model"] == str(tiny_clip)


def test_eval_of_a_folder_without_run_json_is_one_clear_error(tmp_path, capsys):
    from ei2.cli import main

    assert main(["eval", str(tmp_path), "--metrics", "flow"]) == 2
    assert "not an ei2 run folder" in capsys.readouterr().err
