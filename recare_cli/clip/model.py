"""A loaded CLIP (open_clip's model, tokenizer and preprocessing) and the open_clip plumbing the
loaders share."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    import torch

OPEN_CLIP_CONFIG = "open_clip_config.json"
LOCAL_DIR = "local-dir:"


@dataclass
class ClipModel:
    """A loaded CLIP with the model's own tokenizer and image preprocessing."""

    model: Any
    tokenizer: Any
    preprocess: Any
    key: str  # identifies model + weights; used in cache keys
    name: str
    pretrained: str | None
    device: str = "cpu"

    @property
    def logit_scale(self) -> float:
        """The learned temperature, exponentiated: logits = logit_scale * image @ text.T."""
        return float(self.model.logit_scale.detach().exp().item())

    def encode_text(self, texts: Sequence[str], batch_size: int = 256, task=None) -> "torch.Tensor":
        """L2-normalised float32 text embeddings [n, d] on the CPU; `task` is advanced per text."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size * 8):
                part = list(texts[start:start + batch_size * 8])
                tokens = self.tokenizer(part)
                # Batching texts of similar length keeps the cut after end-of-text short (_encode_tokens).
                order = torch.argsort(tokens.argmax(dim=-1), stable=True)
                sorted_features = []
                for b in range(0, len(part), batch_size):
                    batch_tokens = tokens[order[b:b + batch_size]].to(self.device)
                    features = self._encode_tokens(batch_tokens).float()
                    sorted_features.append(torch.nn.functional.normalize(features, dim=-1).cpu())
                    if task is not None:
                        task.advance(len(batch_tokens))
                chunks.append(torch.cat(sorted_features)[torch.argsort(order)])
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    def _encode_tokens(self, tokens: "torch.Tensor") -> "torch.Tensor":
        """The text tower on the tokens up to the last end-of-text only.

        With a causal mask and pooling at the end-of-text token (CLIP's argmax), no position after
        it can change the output, so cutting the padding is exact; vocabulary tokens are 3-10 tokens
        long out of 77, which makes the 49,408-token vocabulary several times cheaper to encode.
        """
        import torch

        model = self.model
        if not _causal_argmax_text(model):
            return model.encode_text(tokens)
        eot_positions = tokens.argmax(dim=-1)
        length = int(eot_positions.max()) + 1
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(pooled)
        return pooled @ model.text_projection

    def encode_images(self, images: Sequence, batch_size: int = 32) -> "torch.Tensor":
        """L2-normalised float32 image embeddings [n, d] on the CPU, PIL images in."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                pixels = torch.stack([self.preprocess(image.convert("RGB"))
                                      for image in images[start:start + batch_size]])
                features = self.model.encode_image(pixels.to(self.device)).float()
                chunks.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)


def _causal_argmax_text(model) -> bool:
    """Whether `model` is open_clip's built-in text tower with a causal mask and argmax pooling."""
    import open_clip
    import torch

    mask = getattr(model, "attn_mask", None)
    if not isinstance(model, open_clip.CLIP) or getattr(model, "text_pool_type", None) != "argmax" or mask is None:
        return False
    return bool(torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)))


@contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip logs through the root logger and warns freely; recare owns the terminal."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
