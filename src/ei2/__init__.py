"""ei2: consistent text-driven video editing with text-to-image diffusion models (EI², NeurIPS 2023)."""
from .errors import EI2Error
from .models import RECIPES, AdapterMismatchError, Recipe, VideoUNet
from .pipeline import EI2Pipeline, EI2PipelineOutput

__version__ = "0.1.0"
__all__ = ["RECIPES", "Recipe", "VideoUNet", "AdapterMismatchError", "EI2Pipeline", "EI2PipelineOutput", "EI2Error",
           "__version__"]
