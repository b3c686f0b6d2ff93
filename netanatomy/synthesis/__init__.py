"""Synthesis of weights: averages (SWA-style, EMA), soups, merges through task
vectors (task arithmetic, TIES, DARE) and slerp, interpolation curves and loss
barriers, permutation alignment (weight matching), batch-norm recalibration.
Outputs are safetensors files written atomically with a SHA-256.
"""

from .average import AverageResult, average, ema, ema_weights
from .bn import recalibrate_bn
from .chain import Chain, infer_chain, spec_from_state
from .evaluate import CommandEvaluator
from .interpolate import InterpolationCurve, interpolate, loss_barrier, plot_interpolation
from .merge import MergeResult, dare, dare_linear, dare_ties, merge, model_stock, slerp, task_arithmetic, ties
from .permute import (
    AlignResult,
    align,
    apply_permutation,
    random_permutations,
    spec_from_module,
    weight_matching,
)
from .soup import SoupResult, greedy_soup, uniform_soup
from .spec import PermutationSpec

__all__ = [
    "AlignResult",
    "AverageResult",
    "Chain",
    "CommandEvaluator",
    "InterpolationCurve",
    "MergeResult",
    "PermutationSpec",
    "SoupResult",
    "align",
    "apply_permutation",
    "average",
    "dare",
    "dare_linear",
    "dare_ties",
    "ema",
    "ema_weights",
    "greedy_soup",
    "infer_chain",
    "interpolate",
    "loss_barrier",
    "merge",
    "model_stock",
    "plot_interpolation",
    "random_permutations",
    "recalibrate_bn",
    "slerp",
    "spec_from_module",
    "spec_from_state",
    "task_arithmetic",
    "ties",
    "uniform_soup",
    "weight_matching",
]
