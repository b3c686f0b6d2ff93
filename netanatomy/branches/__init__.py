"""Branch specialization (Distill, "Branch Specialization"): branch discovery,
per-neuron descriptors from the weights, hypergeometric specialization counts,
and SVD maps of ``|W|`` between consecutive conv layers.

The registered analysis is ``branches`` (``netanatomy analyze MODEL --only branches``).
"""

from .descriptors import RGBDescriptors, UserLabels, kmeans, pattern_clusters, read_labels, rgb_categories, rgb_descriptors
from .discovery import Branch, BranchPoint, Discovery, Segment, discover
from .specialization import Test, adjust, all_in_branch_probability, category_tests, continuous_tests, hypergeom_tail
from .svd import PairMaps, SVDMap, connection_matrix, correlate, separation_auc, svd_maps

__all__ = [
    "Branch",
    "BranchPoint",
    "Discovery",
    "PairMaps",
    "RGBDescriptors",
    "SVDMap",
    "Segment",
    "Test",
    "UserLabels",
    "adjust",
    "all_in_branch_probability",
    "category_tests",
    "connection_matrix",
    "continuous_tests",
    "correlate",
    "discover",
    "hypergeom_tail",
    "kmeans",
    "pattern_clusters",
    "read_labels",
    "rgb_categories",
    "rgb_descriptors",
    "separation_auc",
    "svd_maps",
]
