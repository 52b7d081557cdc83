"""Prompt tokenizers for the umT5 text encoder (docs/ARCHITECTURE.md §4).

`UMT5Tokenizer` reads the Hugging Face tokenizer files that ship in `<Wan folder>/google/umt5-xxl/` with the
lightweight `tokenizers` library (never transformers, never a download). `ByteTokenizer` stands in for it with
the random-weights `tiny` config, where no tokenizer files exist.

Both return `(ids, mask)`: long tensors of shape [B, text_len]; ids end with EOS (`</s>`, as T5 appends it
when `add_special_tokens=True`) and are right-padded with the pad id; mask is 1 on real tokens, 0 on padding.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Sequence, Union

import torch

UMT5_SUBFOLDER = Path("google") / "umt5-xxl"

Prompts = Union[str, Sequence[str]]

_WHITESPACE = re.compile(r"\s+")

try:  # optional: the same text repairs the reference applies before tokenizing
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: ftfy fixes (when ftfy is installed), HTML unescaping (twice),
    then every whitespace run collapsed to one space and the ends stripped."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _as_list(prompts: Prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}")
    return prompts


class UMT5Tokenizer:
    """umT5 SentencePiece-Unigram tokenizer loaded from a local `tokenizer.json`.

    Call conventions match the reference (`padding='max_length', truncation=True, max_length=text_len,
    add_special_tokens=True`): at most text_len - 1 text tokens, then `</s>`, then pad ids.
    """

    def __init__(self, tokenizer, text_len: int = 512, eos_token: str = "</s>", pad_token: str = "<pad>",
                 source: str = "<memory>"):
        from tokenizers import processors

        if text_len < 2:
            raise ValueError(f"text_len must be at least 2, got {text_len}")
        self.text_len = int(text_len)
        self.source = source
        eos_id = tokenizer.token_to_id(eos_token)
        pad_id = tokenizer.token_to_id(pad_token)
        if eos_id is None:
            raise ValueError(f"{source}: EOS token {eos_token!r} is not in the vocabulary")
        if pad_id is None:
            raise ValueError(f"{source}: pad token {pad_token!r} is not in the vocabulary")
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.eos_token, self.pad_token = eos_token, pad_token
        # T5 appends </s> to every sequence (transformers' T5 tokenizer installs exactly this template).
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}",
            special_tokens=[(eos_token, self.eos_id)],
        )
        tokenizer.enable_truncation(max_length=self.text_len, strategy="longest_first", direction="right")
        tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=pad_token, length=self.text_len)
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, path: str | Path, text_len: int = 512) -> "UMT5Tokenizer":
        """Load from the Wan folder (reads `<path>/google/umt5-xxl/tokenizer.json`) or from the
        `google/umt5-xxl` folder itself. Special tokens come from `special_tokens_map.json` /
        `tokenizer_config.json` when present (defaults `</s>`, `<pad>`)."""
        from tokenizers import Tokenizer

        path = Path(path)
        folder = path if (path / "tokenizer.json").is_file() else path / UMT5_SUBFOLDER
        file = folder / "tokenizer.json"
        if not folder.is_dir():
            raise FileNotFoundError(f"umT5 tokenizer folder not found: {folder}")
        if not file.is_file():
            raise FileNotFoundError(f"umT5 tokenizer file not found: {file}")
        specials = {"eos_token": "</s>", "pad_token": "<pad>"}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins
            f = folder / name
            if not f.is_file():
                continue
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{f}: not readable JSON: {exc}") from exc
            for key in specials:
                value = data.get(key)
                if isinstance(value, dict):  # AddedToken form {"content": ...}
                    value = value.get("content")
                if isinstance(value, str) and value:
                    specials[key] = value
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise ValueError(f"{file}: cannot load tokenizer: {exc}") from exc
        return cls(tok, text_len=text_len, source=str(file), **specials)

    def __call__(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [clean_prompt(p) for p in _as_list(prompts)]
        encs = self._tok.encode_batch(texts, add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long).reshape(len(texts), self.text_len)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long).reshape(len(texts), self.text_len)
        return ids, mask


class ByteTokenizer:
    """UTF-8 bytes as ids, for random-weights configs without tokenizer files.

    pad = 0, eos = 1, unk = 2 (the T5 layout); byte b maps to b + 3, so vocab_size must be at least 259.
    """

    PAD, EOS, UNK, OFFSET = 0, 1, 2, 3

    def __init__(self, vocab_size: int, text_len: int = 512):
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {256 + self.OFFSET}, got {vocab_size}")
        if text_len < 2:
            raise ValueError(f"text_len must be at least 2, got {text_len}")
        self.vocab_size = int(vocab_size)
        self.text_len = int(text_len)
        self.eos_id, self.pad_id = self.EOS, self.PAD

    def __call__(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [clean_prompt(p) for p in _as_list(prompts)]
        ids = torch.full((len(texts), self.text_len), self.PAD, dtype=torch.long)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.long)
        for row, text in enumerate(texts):
            seq = [b + self.OFFSET for b in text.encode("utf-8")[: self.text_len - 1]] + [self.EOS]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask
