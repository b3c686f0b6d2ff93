"""netanatomy: read trained neural networks through their weights."""

from .analysis import (
    Analysis,
    AnalysisResult,
    LayerwiseAnalysis,
    available_analyses,
    get_analysis,
    register_analysis,
    run_analyses,
)
from .errors import LayerError, LoadError, NetanatomyError, NonFiniteWeightsError, UnsafeFileError, UserError
from .io import load
from .model import Edge, Graph, Layer, LayerKind, Model, SkippedTensor

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AnalysisResult",
    "Edge",
    "Graph",
    "Layer",
    "LayerError",
    "LayerKind",
    "LayerwiseAnalysis",
    "LoadError",
    "Model",
    "NetanatomyError",
    "NonFiniteWeightsError",
    "SkippedTensor",
    "UnsafeFileError",
    "UserError",
    "available_analyses",
    "get_analysis",
    "load",
    "register_analysis",
    "run_analyses",
    "__version__",
]
