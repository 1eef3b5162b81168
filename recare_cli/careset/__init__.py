"""The CARE set ("dictionary") of recare-method.md §6: words that co-occur with a concept in its
images but are not the concept, turned into anchor ("A {word}") and retain ("A photo of {word}")
prompts for stage 2.

The pipeline: CLIP vocabulary embeddings (cached) → top-k tokens per image (matrix products) →
the most frequent tokens → `select_tokens`, a pure function of embeddings (residuals w.r.t. the
concept, t-SNE + k-means clusters, dropping the extreme clusters, intra-cluster refinement) →
careset.json (the reference's format) and careset.report.json (how every token was decided).

The package's parts: `file` (the careset.json format: writing and reading it), `select` (the
pure selection and its report) and `build` (images to careset.json).
"""

from recare_cli.careset.build import CaresetResult, build_careset, embed_images, frequent_tokens
from recare_cli.careset.file import (
    CARESET_FILE, DEFAULT_PROMPT_STYLE, PROMPT_STYLES, REPORT_FILE, CareSet, careset_json, careset_key,
    prompt_style_for, read_careset, strip_word_end,
)
from recare_cli.careset.select import (
    TSNE_PERPLEXITY, Selection, SelectionParams, cluster_tokens, refine_cluster, select_tokens, selection_report,
)

__all__ = [
    "CARESET_FILE", "DEFAULT_PROMPT_STYLE", "PROMPT_STYLES", "REPORT_FILE", "TSNE_PERPLEXITY", "CareSet",
    "CaresetResult", "Selection", "SelectionParams", "build_careset", "careset_json", "careset_key",
    "cluster_tokens", "embed_images", "frequent_tokens", "prompt_style_for", "read_careset", "refine_cluster",
    "select_tokens", "selection_report", "strip_word_end",
]
