"""Weight banding (Distill "Weight Banding"): NMF pictures of conv kernels, a
banding score and banding types per layer (the causal experiments: :mod:`netanatomy.experiments.banding`).

- :mod:`netanatomy.banding.nmf`: batched posneg NMF of a whole layer.
- :mod:`netanatomy.banding.core`: alignment, ordering, V_y / V_x scores, k-means types.
- :mod:`netanatomy.banding.analysis`: the registered analysis ``banding``.
- :mod:`netanatomy.banding.figures`: picture grids and type tables (matplotlib, lazy).
"""

from .core import (  # noqa: F401
    LayerBanding,
    align_colours,
    analyse_weight,
    band_scores,
    banding_score,
    classify,
    kmeans,
    null_v,
    reduce_layer,
)
from .nmf import nmf_batched, posneg, reduce_kernels  # noqa: F401
