"""The inflated video UNet, its frame-attention processors, temporal modules and recipes."""
from .frame_attention import FineCoarseFrameAttention, FullFrameAttention, SparseCausalAttention
from .recipes import RECIPES, Recipe, get_recipe
from .temporal import InstanceCentering, ShiftRestrictedTemporalAttention, SpectralNormalization, TemporalAttention
from .video_unet import AdapterMismatchError, VideoTransformerBlock, VideoUNet, VideoUNetOutput, BaseFingerprint

__all__ = [
    "RECIPES", "Recipe", "get_recipe", "VideoUNet", "VideoUNetOutput", "VideoTransformerBlock", "AdapterMismatchError",
    "FineCoarseFrameAttention", "SparseCausalAttention", "FullFrameAttention", "InstanceCentering",
    "ShiftRestrictedTemporalAttention", "TemporalAttention", "SpectralNormalization", "BaseFingerprint",
]
