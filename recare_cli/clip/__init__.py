"""CLIP through open_clip: one loader for the CARE set, CARE score, CLIP score and zero-shot labels.

`--clip-model` is an open_clip model name (`ViT-B-32`), an open_clip folder (open_clip_config.json
plus weights), `hf-hub:org/repo`, or a built-in: `toy` (trained on the toy world, shipped in the
package) or `tiny-random` (random weights). `--clip-pretrained` is an open_clip tag (`openai`) or a
local checkpoint file. A built-in is written once into recare's cache as an open_clip folder and
then loaded like any user folder, so tests exercise the real loading path.

The vocabulary embeddings (recare-method.md §6.1) are computed once per model and vocabulary and
kept under `<cache>/clip/<model slug>/` as float16 safetensors.

Nothing heavy is imported at module level.
"""

from recare_cli.clip.builtin import builtin_clip_path
from recare_cli.clip.load import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, default_clip_model, load_clip, locate_clip
from recare_cli.clip.model import LOCAL_DIR, OPEN_CLIP_CONFIG, ClipModel, quiet_open_clip
from recare_cli.clip.vocab import cache_slug, vocab_embeddings

__all__ = ["DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_PRETRAINED", "LOCAL_DIR", "OPEN_CLIP_CONFIG", "ClipModel", "builtin_clip_path",
           "cache_slug", "default_clip_model", "load_clip", "locate_clip", "quiet_open_clip", "vocab_embeddings"]
