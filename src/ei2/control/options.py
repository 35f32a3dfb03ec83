"""The Prompt-to-Prompt options of an edit (`--p2p ...`, the `p2p:` YAML section) and the controller they build.

    config = P2PConfig(mode="replace", cross_replace=0.8, self_replace=0.5, blend_words=("man", "panda"))
    controller = build_controller(config, tokenizer, "a man is skiing", ["a panda is skiing"], num_steps=50)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .. import dataclass_io
from .controllers import AttentionEdit, AttentionRefine, AttentionReplace, AttentionReweight, LocalBlend
from .words import (
    P2PError, check_same_token_count, check_window, cross_replace_alpha, refinement_mapper, require_word,
    step_range, word_token_indices,
)

MODES = ("replace", "refine", "reweight")


@dataclass(frozen=True)
class P2PConfig:
    """Prompt-to-Prompt options.

    mode: `replace` (word swap, same token count), `refine` (added words, aligned tokens) or `reweight`
        (refinement with the `reweight` words' columns scaled).
    cross_replace: fraction of the steps (from the first) during which the source's cross-attention maps
        are injected: a number in [0, 1], a (start, end) pair, or {word: fraction, "default": fraction}.
    self_replace: fraction (or window) of the steps whose frame-attention maps come from the source.
    self_replace_min_level: self maps are replaced at UNet levels >= this (1: all but the full-resolution
        level, which Video-P2P leaves free: it replaces maps of <= 32² tokens of 64² latents).
    reweight: {word of the target prompt: factor} (mode `reweight`).
    blend_words: words (of the source or the target prompt) whose cross-attention masks bound the edit.
    blend_threshold: mask threshold on maps normalised to [0, 1]; a pair gives the `blend_exclude` threshold.
    blend_exclude: words whose mask is removed from the blend mask.
    blend_start: fraction of the steps after which blending starts.
    blend_levels: UNet levels whose maps make the mask (None: level 2, a quarter of the latent side, as P2P).
    """

    mode: str = "replace"
    cross_replace: float | tuple[float, float] | Mapping = 0.8
    self_replace: float | tuple[float, float] = 0.4
    self_replace_min_level: int = 1
    reweight: Mapping[str, float] = field(default_factory=dict)
    blend_words: tuple[str, ...] = ()
    blend_threshold: float | tuple[float, float] = 0.3
    blend_exclude: tuple[str, ...] = ()
    blend_start: float = 0.2
    blend_levels: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise P2PError(f"--p2p {self.mode!r} is not one of {', '.join(MODES)}")
        cross = self.cross_replace
        for word, value in (cross.items() if isinstance(cross, Mapping) else [("", cross)]):
            check_window(value, f"--cross-replace {word + '=' if word else ''}")
        check_window(self.self_replace, "--self-replace")
        check_window(self.blend_start, "--blend-start")
        for th in self.thresholds:
            if not isinstance(th, (int, float)) or not 0 <= th <= 1:
                raise P2PError(f"--blend-threshold must be in [0, 1], got {self.blend_threshold!r}")
        if self.mode == "reweight" and not self.reweight:
            raise P2PError('--p2p reweight needs --reweight WORD=FACTOR, e.g. --reweight "watercolor=4"')
        if self.reweight and self.mode != "reweight":
            raise P2PError(f"--reweight is used with --p2p reweight, not --p2p {self.mode}")
        for word, value in self.reweight.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise P2PError(f"--reweight {word}=: the factor must be a number, got {value!r}")
        if self.blend_exclude and not self.blend_words:
            raise P2PError("--blend-exclude needs --blend-words")
        object.__setattr__(self, "blend_words", tuple(self.blend_words))
        object.__setattr__(self, "blend_exclude", tuple(self.blend_exclude))
        if self.blend_levels is not None:
            object.__setattr__(self, "blend_levels", tuple(self.blend_levels))

    @property
    def thresholds(self) -> tuple[float, float]:
        th = self.blend_threshold
        return (th, th) if isinstance(th, (int, float)) else tuple(th)

    def to_dict(self) -> dict:
        return dataclass_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "P2PConfig":
        """From the `p2p:` section of a YAML config (keys as the field names)."""
        return dataclass_io.from_dict(cls, data, "p2p", P2PError)


def parse_cross_replace(values: Sequence[str]) -> float | dict[str, float]:
    """CLI `--cross-replace 0.8 [WORD=FRACTION ...]` -> 0.8 or {"default": 0.8, WORD: FRACTION}."""
    result: dict[str, float] = {}
    for value in values:
        word, _, number = value.rpartition("=")
        try:
            result[word or "default"] = float(number)
        except ValueError:
            raise P2PError(f"--cross-replace {value!r}: expected a fraction such as 0.8 or WORD=0.5") from None
    return result["default"] if list(result) == ["default"] else result


def parse_reweight(values: Sequence[str]) -> dict[str, float]:
    """CLI `--reweight WORD=FACTOR [...]` -> {WORD: FACTOR}."""
    result = {}
    for value in values:
        word, sep, number = value.partition("=")
        try:
            if not sep or not word:
                raise ValueError
            result[word] = float(number)
        except ValueError:
            raise P2PError(f"--reweight {value!r}: expected WORD=FACTOR, e.g. watercolor=4") from None
    return result


def _word_weights(tokenizer, prompts: Sequence[str], words: Sequence[str], option: str) -> torch.Tensor:
    """(p, L): 1 at the tokens of each word in every prompt that has it; a word in no prompt is an error."""
    weights = torch.zeros(len(prompts), tokenizer.model_max_length)
    for word in words:
        hits = [word_token_indices(tokenizer, p, word) for p in prompts]
        if not any(hits):
            raise P2PError(f"{option} word {word!r} is in neither prompt ({' / '.join(map(repr, prompts))}); "
                           "use a word of the source or the target prompt")
        for k, idx in enumerate(hits):
            weights[k, idx] = 1.0
    return weights


def build_controller(config: P2PConfig, tokenizer, source_prompt: str, target_prompts: str | Sequence[str],
                     num_steps: int) -> AttentionEdit:
    """The controller of an edit of `source_prompt` into each of `target_prompts` over `num_steps` DDIM steps."""
    targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
    prompts = [source_prompt, *targets]
    if config.mode == "replace":
        for target in targets:
            check_same_token_count(tokenizer, source_prompt, target)
    cross_alpha = cross_replace_alpha(tokenizer, targets, num_steps, config.cross_replace)
    self_steps = step_range(check_window(config.self_replace, "--self-replace"), num_steps)
    blend = None
    if config.blend_words:
        exclude = _word_weights(tokenizer, prompts, config.blend_exclude, "--blend-exclude") if config.blend_exclude else None
        blend = LocalBlend(
            _word_weights(tokenizer, prompts, config.blend_words, "--blend-words"), config.thresholds,
            start_step=int(config.blend_start * num_steps), exclude_weights=exclude, levels=config.blend_levels,
        )
    common = dict(self_replace_min_level=config.self_replace_min_level, local_blend=blend)
    if config.mode == "replace":
        return AttentionReplace(len(prompts), cross_alpha, self_steps, **common)
    mappers = [refinement_mapper(tokenizer, source_prompt, t) for t in targets]
    mapper, alphas = torch.stack([m for m, _ in mappers]), torch.stack([a for _, a in mappers])
    if config.mode == "refine":
        return AttentionRefine(len(prompts), cross_alpha, self_steps, mapper, alphas, **common)
    equalizer = torch.ones(len(targets), tokenizer.model_max_length)
    for word, factor in config.reweight.items():
        for k, target in enumerate(targets):
            equalizer[k, require_word(tokenizer, target, word, "--reweight")] = factor
    return AttentionReweight(len(prompts), cross_alpha, self_steps, mapper, alphas, equalizer, **common)
