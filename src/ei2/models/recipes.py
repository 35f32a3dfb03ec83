"""Recipes: which frame attention, which temporal module where, and what is tuned (DESIGN §1.5).

A recipe is data, chosen once when a 2D UNet is inflated; the ablations of the paper (TA vs STAM,
SCA vs FFAM, module order) are just other recipes.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass

from .. import dataclass_io

FRAME_ATTENTIONS = ("self", "sparse-causal", "ffam", "full")
TEMPORAL_MODULES = ("none", "ta", "stam")
TEMPORAL_POSITIONS = ("after-self", "after-cross", "after-ff")
GROUP_NORMS = ("frame", "video")

# Parameter-name globs (fnmatch, on names of the VideoUNet's parameters).
FRAME_QUERY = "*.attn1.to_q.*"
CROSS_QUERY = "*.attn2.to_q.*"
STAM_ALL = "*.stam.*"
TA_ATTENTION = "*.temporal_attention.attn.*"  # Tune-A-Video trains attn_temp, keeps norm_temp frozen


@dataclass(frozen=True)
class Recipe:
    """How a text-to-image UNet is inflated to video.

    frame_attention: what replaces self-attention: `self` (per frame), `sparse-causal` (frames 0 and
        i-1, Tune-A-Video), `ffam` (fine current frame + coarse other frames, EI²), `full` (all frames).
    temporal: temporal module added to each transformer block: `none`, `ta` (Tune-A-Video) or `stam`.
    temporal_position: where in the block it sits: after self-, after cross-attention or after the FF.
    coarse_factor: spatial pooling of the other frames in FFAM.
    group_norm: `video` (ResNet and output GroupNorm statistics over all frames, as Tune-A-Video) or
        `frame` (the 2D model's per-frame statistics).
    trainable: fnmatch patterns of the parameter names tuned on the video.
    """

    name: str = "custom"
    frame_attention: str = "ffam"
    temporal: str = "stam"
    temporal_position: str = "after-self"
    coarse_factor: int = 2
    group_norm: str = "video"
    trainable: tuple[str, ...] = (FRAME_QUERY, CROSS_QUERY, STAM_ALL)

    def __post_init__(self):
        for field, allowed in (
            ("frame_attention", FRAME_ATTENTIONS),
            ("temporal", TEMPORAL_MODULES),
            ("temporal_position", TEMPORAL_POSITIONS),
            ("group_norm", GROUP_NORMS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"recipe {self.name!r}: {field}={value!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.coarse_factor, int) or self.coarse_factor < 1:
            raise ValueError(f"recipe {self.name!r}: coarse_factor must be an integer >= 1, got {self.coarse_factor!r}")
        object.__setattr__(self, "trainable", tuple(self.trainable))

    def is_trainable(self, parameter_name: str) -> bool:
        return any(fnmatch.fnmatchcase(parameter_name, pattern) for pattern in self.trainable)

    def to_dict(self) -> dict:
        return dataclass_io.to_dict(self)

    def digest(self) -> str:
        """Identity of the recipe's contents (every field, not only its name: custom recipes are all "custom")."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        return dataclass_io.from_dict(cls, data, "recipe")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("ei2", "ffam", "stam", "after-self"),
        Recipe("ei2-after-cross", "ffam", "stam", "after-cross"),
        Recipe(
            "tune-a-video", "sparse-causal", "ta", "after-ff",
            trainable=(FRAME_QUERY, CROSS_QUERY, TA_ATTENTION),
        ),
        # Ablations: swap one module of a recipe for the other method's.
        Recipe("tune-a-video+stam", "sparse-causal", "stam", "after-self"),
        Recipe("ei2-ta", "ffam", "ta", "after-ff", trainable=(FRAME_QUERY, CROSS_QUERY, TA_ATTENTION)),
    )
}


def get_recipe(recipe: "str | Recipe") -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[recipe]
