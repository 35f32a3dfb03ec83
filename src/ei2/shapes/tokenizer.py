"""A CLIP BPE tokenizer for the Shapes world in which every caption word is one token.

The files are the ones a Stable Diffusion `tokenizer/` folder holds (`vocab.json`, `merges.txt`,
`tokenizer_config.json`, `special_tokens_map.json`) and load with `CLIPTokenizer.from_pretrained`.
(Under transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)` built directly gave an empty
vocabulary, every word unknown, silently: always load the folder, and `check_tokenizer` it.)

The vocabulary is CLIP's byte alphabet (each byte alone and word-final), one merged token per
prefix of each caption word, and the two special tokens last, as in CLIP. Merges are built by
running CLIP's own BPE over the words and appending merges until every word is a single token;
appended merges have the lowest priority, so they never change a word that already merges whole.
"""
from __future__ import annotations

import json
from pathlib import Path

from .world import caption_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 32


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word: merge the best-ranked adjacent pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best = min(pairs)[0]
        if best == float("inf"):
            break
        pair = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) such that CLIP's BPE turns each of `words` into one token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(100):
        pending = False
        for word in words:
            parts = _bpe(word, ranks)
            if len(parts) == 1:
                continue
            pending = True
            acc = parts[0]
            for nxt in parts[1:]:  # left to right: (w, o), (wo, r), (wor, d</w>)
                if (acc, nxt) not in ranks:
                    ranks[(acc, nxt)] = len(merges)
                    merges.append((acc, nxt))
                acc += nxt
        if not pending:
            break
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str | Path, words: list[str] | None = None) -> Path:
    """Write the tokenizer files for `words` (default: every word of the world's captions)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words or caption_words())
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2 - ei2 Shapes world"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, "do_lower_case": True,
        "clean_up_tokenization_spaces": True, "errors": "replace", "add_prefix_space": False, **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def check_tokenizer(tokenizer, words: list[str] | None = None) -> None:
    """Raise if any caption word is not exactly one known token (catches the silent empty vocabulary)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) < 300:
        raise ValueError(f"tokenizer vocabulary has {len(vocab)} entries; it did not load (use CLIPTokenizer.from_pretrained)")
    unk = tokenizer.unk_token_id
    for word in words or caption_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == unk or tokenizer.convert_ids_to_tokens(ids[0]) != word + "</w>":
            raise ValueError(f"word {word!r} tokenizes to {tokenizer.convert_ids_to_tokens(ids)}; expected one token {word}</w>")
