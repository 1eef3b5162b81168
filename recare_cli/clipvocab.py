"""The CLIP BPE vocabulary that open_clip ships, as token strings and as a HF CLIPTokenizer.

Both SD's tokenizer (openai/clip-vit-large-patch14) and open_clip's use this exact vocabulary, so
recare needs no download to tokenize: 256 byte symbols, the same with `</w>`, 48,894 merges and
the two special tokens, 49,408 in all.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2


def _bpe_path() -> str:
    from open_clip.tokenizer import default_bpe

    return default_bpe()


@lru_cache(maxsize=1)
def merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)


@lru_cache(maxsize=1)
def vocab() -> tuple[str, ...]:
    """Token strings in id order (`</w>` kept, as in the vocabulary file)."""
    from open_clip.tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [b + "</w>" for b in byte_symbols]
    tokens += ["".join(pair) for pair in merges()]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return tuple(tokens)


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt, the files transformers' CLIPTokenizer is built from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab())}), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges()) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def build_tokenizer(folder: Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """`pad_token` "!" is SD 2.x's (OpenCLIP pads with id 0); SD 1.x pads with the end token."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
