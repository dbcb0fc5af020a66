"""Agglomerative Token Clustering (ATC) for Vision Transformers, and the token-merging baselines.

Importing the package registers the ``atc_``/``tome_``/``kmedoids_``/``dpcknn_`` models with timm (see
:mod:`atc.models`).

    import atc
    labels = atc.cluster.agglomerative_clustering(metric, num_clusters=98, linkage="average")
"""

from atc import cluster, merge, models
from atc.cluster import agglomerative_clustering, available_backends

__version__ = "0.1.0"

__all__ = ["cluster", "merge", "models", "agglomerative_clustering", "available_backends", "__version__"]
