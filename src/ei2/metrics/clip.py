"""CLIP metrics of an edited video (DESIGN §2), with any transformers `CLIPModel`.

- Textual alignment, **Tex-Ali** = 100 · mean_i cos(E_img(x_i), E_txt(target)).
- Temporal consistency, **Tem-Con** = mean_i cos(E_img(x_i), E_img(x_{i+1})), in [-1, 1]
  (1.0 for a still video); `temporal_consistencies` gives the cosine of each pair.
- **Frame accuracy** = share of frames i with cos(x_i, target) > cos(x_i, source).

The embeddings are CLIP's projected, L2-normalised image and text features. The default model is
the embedded Shapes CLIP (`assets/shapes-clip`); Stable Diffusion edits are scored with an OpenAI
CLIP such as `openai/clip-vit-large-patch14` (a local folder, or a hub id when online).

    scorer = ClipScorer()                       # or ClipScorer("path/to/clip-vit-large-patch14")
    clip_metrics(frames, "a blue circle ...", "a red circle ...", scorer)
    # {"tex_ali": 31.2, "tem_con": 0.987, "frame_acc": 1.0}
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_clip_path() -> Path:
    """The embedded Shapes CLIP: `assets/shapes-clip` of the source tree."""
    import ei2

    return Path(ei2.__file__).resolve().parents[2] / "assets" / "shapes-clip"


# ---------------------------------------------------------------------------------------------- metrics
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def textual_alignment(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Tex-Ali: 100 x mean cosine of frame embeddings (f, d) with one text embedding (d,)."""
    return float(100.0 * (_normalise(image_emb) @ _normalise(text_emb.reshape(-1))).mean())


def temporal_consistencies(image_emb: torch.Tensor) -> torch.Tensor:
    """Cosine of each consecutive pair of frame embeddings (f, d) -> (f - 1,): pair i is frames i, i + 1."""
    if image_emb.shape[0] < 2:
        raise ValueError("temporal consistency needs at least 2 frames")
    e = _normalise(image_emb)
    return (e[:-1] * e[1:]).sum(-1)


def temporal_consistency(image_emb: torch.Tensor) -> float:
    """Tem-Con: mean cosine of consecutive frame embeddings (f, d); needs f >= 2."""
    return float(temporal_consistencies(image_emb).mean())


def frame_accuracy(image_emb: torch.Tensor, target_emb: torch.Tensor, source_emb: torch.Tensor) -> float:
    """Share of frames whose embedding is closer (cosine) to the target text than to the source text."""
    e = _normalise(image_emb)
    return float(((e @ _normalise(target_emb.reshape(-1))) > (e @ _normalise(source_emb.reshape(-1)))).float().mean())


# ---------------------------------------------------------------------------------------------- model
class ClipScorer:
    """A transformers `CLIPModel` with its tokenizer and image processor; embeds frames and prompts."""

    def __init__(self, model: str | Path | None = None, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        source = self._resolve(model)
        self.source = str(source)
        try:
            self.model = CLIPModel.from_pretrained(source, use_safetensors=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(source)
        except Exception as e:  # noqa: BLE001 - every loading failure becomes one clear message
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = "folder" if Path(source).is_dir() else "hub id"
            raise ModelError(
                f"cannot load the CLIP model {where} {source} ({reason}); pass --clip-model with a local folder "
                "saved by transformers' CLIPModel.save_pretrained (safetensors), e.g. openai/clip-vit-large-patch14"
            ) from e
        self.processor = self._processor(source)
        self.device = torch.device(device)

    @staticmethod
    def _resolve(model) -> str:
        if model is None:
            path = default_clip_path()
            if not path.is_dir():
                raise ModelError(f"the default Shapes CLIP is not at {path} (it ships with the ei2 source tree); "
                                 "pass --clip-model with a transformers CLIPModel folder or hub id")
            return str(path)
        path = Path(model).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ModelError(f"--clip-model {model}: expected a transformers CLIPModel folder, got a file")
            return str(path)
        if str(model).startswith((".", "/", "~")) or not _HUB_ID.match(str(model)):
            raise ModelError(f"CLIP model folder not found: {model}; "
                             "pass --clip-model with a transformers CLIPModel folder")
        return str(model)

    def _processor(self, source: str):
        """The folder's CLIPImageProcessor; without one, CLIP's standard preprocessing at the model's size."""
        try:  # transformers >= 5: the PIL processor (the default one wants torchvision)
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor
        try:
            return Processor.from_pretrained(source)
        except Exception:  # noqa: BLE001 - no preprocessor_config.json: OpenAI CLIP's defaults
            side = int(self.model.config.vision_config.image_size)
            return Processor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    @torch.no_grad()
    def embed_images(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """(f, h, w, 3) uint8 -> (f, d) L2-normalised image embeddings."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (f, h, w, 3) uint8, got {frames.shape}")
        out = []
        for start in range(0, len(frames), batch_size):
            pixels = self.processor(images=list(frames[start:start + batch_size]), return_tensors="pt").pixel_values
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled))
        return _normalise(torch.cat(out)).cpu()

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (n, d) L2-normalised text embeddings (padded to the tokenizer's length, as SD does)."""
        length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        pooled = self.model.text_model(input_ids=ids.to(self.device)).pooler_output
        return _normalise(self.model.text_projection(pooled)).cpu()


def clip_metrics(frames: np.ndarray, target_prompt: str, source_prompt: str | None = None,
                 scorer: ClipScorer | None = None) -> dict[str, float]:
    """Tex-Ali, Tem-Con and (with a source prompt) frame accuracy of one edited video (f, h, w, 3)."""
    scorer = scorer or ClipScorer()
    images = scorer.embed_images(frames)
    texts = scorer.embed_texts([target_prompt] + ([source_prompt] if source_prompt else []))
    out = {"tex_ali": textual_alignment(images, texts[0])}
    if len(images) >= 2:
        out["tem_con"] = temporal_consistency(images)
    if source_prompt:
        out["frame_acc"] = frame_accuracy(images, texts[0], texts[1])
    return out
