"""The Shapes world and the embedded Shapes model (DESIGN §3).

- `world`: seeded renders of coloured shapes (images and videos) with their captions;
- `oracle`: reads colour, shape, background, centre and size back from any 64x64 frame;
- `tokenizer`: CLIP BPE files in which every caption word is one token;
- `models`, `train`, `evaluate`: pretraining of the small CLIP, VAE and UNet shipped in
  `assets/shapes-clip` and `assets/shapes-sd`, and the model card's quality bars;
- `samples`: the bundled sample videos of `assets/samples`.
"""
from .oracle import Reading, read_frames
from .world import (
    BACKGROUND_NAMES, COLOR_NAMES, MOTIONS, SHAPES, Scenes, ShapesVideo, caption, degrade, random_scenes,
    random_video, render, video_scenes,
)

__all__ = [
    "BACKGROUND_NAMES", "COLOR_NAMES", "MOTIONS", "SHAPES", "Reading", "Scenes", "ShapesVideo", "caption",
    "degrade", "random_scenes", "random_video", "read_frames", "render", "video_scenes",
]
