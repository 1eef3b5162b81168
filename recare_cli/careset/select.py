"""Choosing the CARE words (recare-method.md §6.3-6.5), a pure function of embeddings: residuals
with respect to the concept, t-SNE + k-means clusters, dropping the extreme clusters, refining
within each cluster; and the report of how every token was decided."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from recare_cli.careset.file import strip_word_end
from recare_cli.errors import UsageError

TSNE_PERPLEXITY = 30.0  # sklearn's default, which the reference uses


@dataclass
class SelectionParams:
    n_clusters: int = 7
    k_each_side: int = 1
    min_cluster_size: int = 2
    alpha: float = 0.01
    seed: int = 42


@dataclass
class Selection:
    kept: list[int]  # indices of the kept tokens, in input order
    labels: list[int]  # cluster of each token; 0 = lowest mean residual
    similarity: list[float]  # W . C
    residual_norm: list[float]  # ||W - (W . c_hat) c_hat||
    cluster_mean_residual: list[float]  # per cluster, in label order
    removed_clusters: dict[int, str]  # cluster -> "lowest residual" | "highest residual"
    refinement_d: dict[int, float] = field(default_factory=dict)  # token -> d_i, refined clusters only
    refined_away: list[int] = field(default_factory=list)
    perplexity: float | None = TSNE_PERPLEXITY  # None: no t-SNE (too few tokens)
    n_clusters: int = 7
    tsne: list[tuple[float, float]] = field(default_factory=list)  # each token's place on the 2-D map


def cluster_tokens(token_embeddings, n_clusters: int, seed: int):
    """(cluster labels, t-SNE perplexity or None, 2-D map): t-SNE to 2-D (seeded, PCA init, auto
    learning rate), then k-means.

    t-SNE needs more tokens than its perplexity (30). With fewer (a short --vocab list such as the
    toy world's) k-means runs on the embeddings themselves and the map is their first two
    principal components: a t-SNE of a dozen points is chaotic. On the toy's 9 candidate words it
    put `night` into star's cluster in one process and not in another, from float noise alone.
    """
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    embeddings = np.asarray(token_embeddings, dtype=np.float64)
    # A hundred points gain nothing from threads, and OpenMP spin-waiting on a busy CPU made
    # t-SNE 10-25x slower; one thread gives the same numbers.
    with threadpool_limits(1):
        if embeddings.shape[0] > TSNE_PERPLEXITY:
            perplexity = TSNE_PERPLEXITY
            points = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                          random_state=seed).fit_transform(embeddings)
            map_2d = points
        else:
            perplexity, points = None, embeddings
            centred = embeddings - embeddings.mean(axis=0)
            map_2d = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
        # n_init fixed (not "auto") so the clusters do not change with the sklearn version.
        labels = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10).fit_predict(points)
    return labels, perplexity, map_2d


def refine_cluster(residuals, alpha: float):
    """(keep mask, d) for one cluster's residuals [m, d] (already orthogonal to the concept, §6.5).

    d_i = ||mean of the other tokens' residuals||²; a token whose removal makes the rest much more
    coherent (d_i > (1 + alpha) * mean of the other d) is an outlier of the cluster.
    """
    import numpy as np

    residuals = np.asarray(residuals, dtype=np.float64)
    m = residuals.shape[0]
    leave_one_out_means = (residuals.sum(axis=0, keepdims=True) - residuals) / (m - 1)
    d = (leave_one_out_means ** 2).sum(axis=1)
    mean_other_d = (d.sum() - d) / (m - 1)
    return d <= (1 + alpha) * mean_other_d, d


def select_tokens(token_embeddings, concept_embedding, params: SelectionParams | None = None) -> Selection:
    """§6.3-6.5 on float arrays: W [n, d] (L2-normalised token embeddings) and C [d]."""
    import numpy as np

    params = params or SelectionParams()
    W = np.asarray(token_embeddings, dtype=np.float64)
    C = np.asarray(concept_embedding, dtype=np.float64).reshape(-1)
    n = W.shape[0]
    if n < 2:
        raise UsageError(f"only {n} candidate token(s): need at least 2 to cluster",
                         hint="use more images, a larger --top-n-tokens, or a longer --vocab list")
    if not 1 <= params.n_clusters <= n:
        raise UsageError(f"--n-clusters {params.n_clusters} must be between 1 and the number of tokens ({n})")
    c_hat = C / np.linalg.norm(C)
    similarity = W @ C
    residuals = W - np.outer(W @ c_hat, c_hat)
    residual_norm = np.linalg.norm(residuals, axis=1)

    raw_labels, perplexity, map_2d = cluster_tokens(W, params.n_clusters, params.seed)
    raw_means = np.array([residual_norm[raw_labels == k].mean() for k in range(params.n_clusters)])
    # Renumber clusters by mean residual so that label 0 is the most concept-like.
    rank_of = np.empty(params.n_clusters, dtype=int)
    rank_of[np.argsort(raw_means, kind="stable")] = np.arange(params.n_clusters)
    labels = rank_of[raw_labels]
    cluster_means = np.sort(raw_means, kind="stable")

    # At most (n_clusters - 1) // 2 per side, so at least one cluster always survives.
    drop = min(params.k_each_side, (params.n_clusters - 1) // 2)
    removed = {k: "lowest residual" for k in range(drop)}
    removed.update({params.n_clusters - 1 - k: "highest residual" for k in range(drop)})

    keep = np.array([label not in removed for label in labels])
    refinement_d: dict[int, float] = {}
    for cluster in range(params.n_clusters):
        members = np.nonzero(labels == cluster)[0]
        if cluster in removed or len(members) < max(2, params.min_cluster_size):
            continue
        member_keep, d = refine_cluster(residuals[members], params.alpha)
        refinement_d.update({int(i): float(di) for i, di in zip(members, d)})
        keep[members[~member_keep]] = False
    refined_away = [i for i in refinement_d if not keep[i]]
    return Selection(
        kept=[int(i) for i in np.nonzero(keep)[0]],
        labels=[int(x) for x in labels],
        similarity=[float(x) for x in similarity],
        residual_norm=[float(x) for x in residual_norm],
        cluster_mean_residual=[float(x) for x in cluster_means],
        removed_clusters=removed,
        refinement_d=refinement_d,
        refined_away=sorted(refined_away),
        perplexity=perplexity,
        n_clusters=params.n_clusters,
        tsne=[(float(x), float(y)) for x, y in map_2d],
    )


def selection_report(tokens: Sequence[str], counts: Sequence[int], selection: Selection) -> dict:
    """How every token was decided: its cluster, residual, and why it was kept or dropped."""
    def status(i: int) -> str:
        if selection.labels[i] in selection.removed_clusters:
            return "cluster removed"
        return "refined away" if i in selection.refined_away else "kept"

    token_rows = [
        {"token": tok, "word": strip_word_end(tok), "count": int(counts[i]), "cluster": selection.labels[i],
         "similarity": round(selection.similarity[i], 6), "residual_norm": round(selection.residual_norm[i], 6),
         "refinement_d": round(selection.refinement_d[i], 6) if i in selection.refinement_d else None,
         "tsne": [round(x, 4) for x in selection.tsne[i]], "status": status(i)}
        for i, tok in enumerate(tokens)
    ]
    clusters = []
    for k in range(selection.n_clusters):
        members = [i for i, label in enumerate(selection.labels) if label == k]
        clusters.append({
            "cluster": k, "size": len(members), "mean_residual": round(selection.cluster_mean_residual[k], 6),
            "status": f"removed ({selection.removed_clusters[k]})" if k in selection.removed_clusters else "kept",
            "tokens": [tokens[i] for i in members],
            "refined_away": [tokens[i] for i in members if i in selection.refined_away],
        })
    return {
        "tsne_perplexity": selection.perplexity,
        "n_clusters": selection.n_clusters,
        "clusters": clusters,
        "removed_clusters": sorted(selection.removed_clusters),
        "refined_away": [tokens[i] for i in selection.refined_away],
        "tokens": token_rows,
    }
