"""Agglomerative Token Clustering (ATC) for Vision Transformers, and the token-merging baselines.

    import atc
    labels = atc.cluster.agglomerative_clustering(metric, num_clusters=98, linkage="average")
"""

from atc import cluster, merge
from atc.cluster import agglomerative_clustering, available_backends

__version__ = "0.1.0"

__all__ = ["cluster", "merge", "agglomerative_clustering", "available_backends", "__version__"]
