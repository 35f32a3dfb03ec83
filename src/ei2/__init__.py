"""ei2: consistent text-driven video editing with text-to-image diffusion models (EI², NeurIPS 2023)."""
from .models import RECIPES, AdapterMismatchError, Recipe, VideoUNet

__version__ = "0.1.0"
__all__ = ["RECIPES", "Recipe", "VideoUNet", "AdapterMismatchError", "__version__"]
