"""Prompt-to-Prompt attention control, structure-preserving feature injection and null-text inversion for
EI² video editing (DESIGN §1.8, §1.9, seed B.2).

    controller = build_controller(P2PConfig("replace", blend_words=("man", "panda")), tokenizer,
                                  "a man is skiing", ["a panda is skiing"], num_steps=50)
    latents = controlled_sample(unet, scheduler, x_T.expand(2, -1, -1, -1, -1), text_emb_2,
                                Sampling(50, guidance_scale=7.5), uncond, controller=controller)
"""
from .controllers import (
    AttentionEdit, AttentionRefine, AttentionReplace, AttentionReweight, AttentionStore, LayerPlace, LocalBlend,
)
from .edit import ControlledEdit, controlled_edit, null_text_invert
from .injection import FeatureInjection, InjectionConfig
from .null_text import NullTextCache, NullTextInversion, ddim_inversion_trajectory, null_text_inversion, null_text_key
from .options import P2PConfig, build_controller, parse_cross_replace, parse_reweight
from .processors import ControlledCrossAttention, ControlledFrameAttention, attention_control
from .sampling import controlled_sample
from .visualize import attention_grid, save_attention_grid
from .words import P2PError, refinement_mapper, word_token_indices

__all__ = [
    "ControlledEdit", "controlled_edit", "null_text_invert", "FeatureInjection", "InjectionConfig",
    "AttentionEdit", "AttentionRefine", "AttentionReplace", "AttentionReweight", "AttentionStore", "LayerPlace",
    "LocalBlend", "NullTextCache", "NullTextInversion", "ddim_inversion_trajectory", "null_text_inversion",
    "null_text_key", "P2PConfig", "build_controller", "parse_cross_replace", "parse_reweight",
    "ControlledCrossAttention", "ControlledFrameAttention", "attention_control", "controlled_sample",
    "attention_grid", "save_attention_grid", "P2PError", "refinement_mapper", "word_token_indices",
]
