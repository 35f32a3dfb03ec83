"""Words, tokens and step schedules of Prompt-to-Prompt (Hertz et al. 2022; DESIGN §1.8).

A cross-attention map has one column per text token `L` (77 for CLIP). The edits address columns
by the words of a prompt, so this module finds a word's token positions, aligns the tokens of the
source and target prompts, and turns "replace for the first 80% of the steps" into per-step,
per-token weights:

- word swap (`replace`): both prompts have the same token count; token j of the target takes the
  source's column j (the identity mapping).
- refinement (`refine`): the prompts' token sequences are aligned (longest matching blocks); a
  target token that matches a source token takes that token's column, an added token keeps its own.
"""
from __future__ import annotations

import difflib
import string
from typing import Mapping, Sequence

import torch

from ..errors import ConfigError


class P2PError(ConfigError):
    """A Prompt-to-Prompt option does not fit the prompts (word not in a prompt, token counts, fractions)."""


Window = tuple[float, float]


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` with BOS and EOS, truncated to the text encoder's length, without padding."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def _norm(word: str) -> str:
    return word.lower().strip(string.punctuation)


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the padded token sequence, BOS = 0) of every occurrence of `word` in `prompt`; [] if absent.

    Words are the prompt's whitespace-separated words, compared case-insensitively without surrounding
    punctuation; a word of several tokens gives all of its positions.
    """
    last = len(prompt_tokens(tokenizer, prompt)) - 1  # position of EOS
    found, position = [], 1
    for w in prompt.split():
        n = len(tokenizer(w, add_special_tokens=False).input_ids)
        if _norm(w) == _norm(word):
            found += [i for i in range(position, position + n) if i < last]
        position += n
    return found


def require_word(tokenizer, prompt: str, word: str, what: str) -> list[int]:
    indices = word_token_indices(tokenizer, prompt, word)
    if not indices:
        raise P2PError(f"{what} word {word!r} is not in the prompt {prompt!r}; use a word of that prompt")
    return indices


def check_same_token_count(tokenizer, source: str, target: str) -> None:
    """A word swap maps token j to token j: the prompts must have the same number of tokens."""
    s, t = prompt_tokens(tokenizer, source), prompt_tokens(tokenizer, target)
    if len(s) != len(t):
        raise P2PError(
            f"--p2p replace (word swap) needs prompts with the same number of tokens, but {source!r} has "
            f"{len(s) - 2} and {target!r} has {len(t) - 2}; swap words of equal token length, or use --p2p refine"
        )


def refinement_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token alignment of a refinement: (mapper (L,) long, alphas (L,) float) for one target prompt.

    mapper[j] is the source position whose column target position j takes where alphas[j] = 1; where
    alphas[j] = 0 (a word added by the target) the target keeps its own column. Padding after the
    target's EOS follows the source's padding, as in Prompt-to-Prompt.
    """
    length = tokenizer.model_max_length
    s, t = prompt_tokens(tokenizer, source), prompt_tokens(tokenizer, target)
    mapper = torch.full((length,), -1, dtype=torch.long)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=s, b=t, autojunk=False).get_opcodes():
        if tag == "equal":
            mapper[j1:j2] = torch.arange(i1, i2)
    for j in range(len(t), length):
        mapper[j] = min(len(s) + j - len(t), length - 1)
    alphas = (mapper >= 0).float()
    return mapper.clamp(min=0), alphas


def check_window(spec, name: str) -> Window:
    """A fraction f (the window [0, f]) or a (start, end) pair of fractions, each in [0, 1]."""
    window = (0.0, spec) if isinstance(spec, (int, float)) else tuple(spec)
    ok = len(window) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
    if not ok or not 0 <= window[0] <= window[1] <= 1:
        raise P2PError(
            f"{name} must be a fraction of the denoising steps in [0, 1] (or a (start, end) pair with "
            f"start <= end), got {spec!r}"
        )
    return float(window[0]), float(window[1])


def step_range(window: Window, num_steps: int) -> range:
    """Steps i with start * n <= i < end * n (Prompt-to-Prompt's rounding)."""
    return range(int(window[0] * num_steps), int(window[1] * num_steps))


def cross_replace_alpha(tokenizer, target_prompts: Sequence[str], num_steps: int,
                        spec: "float | Window | Mapping[str, float | Window]", default: float = 0.8) -> torch.Tensor:
    """Per-step, per-token weight of the source's cross-attention in each target: (steps, targets, L).

    `spec`: one fraction (or window) for every token, or a mapping {word: fraction, ..., "default": fraction}
    where words of the target prompts get their own window and every other token gets "default"
    (`default` when absent).
    """
    per_word = dict(spec) if isinstance(spec, Mapping) else {"default": spec}
    base = check_window(per_word.pop("default", default), "--cross-replace")
    alpha = torch.zeros(num_steps, len(target_prompts), tokenizer.model_max_length)
    alpha[list(step_range(base, num_steps))] = 1.0
    for word, value in per_word.items():
        window = check_window(value, f"--cross-replace {word}=")
        hits = [(k, word_token_indices(tokenizer, p, word)) for k, p in enumerate(target_prompts)]
        if not any(idx for _, idx in hits):
            raise P2PError(f"--cross-replace word {word!r} is not in the target prompt {target_prompts[0]!r}; "
                           "use a word of the target prompt")
        steps = torch.zeros(num_steps)
        steps[list(step_range(window, num_steps))] = 1.0
        for k, idx in hits:
            alpha[:, k, idx] = steps[:, None]
    return alpha
