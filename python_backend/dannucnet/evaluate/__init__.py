"""Evaluation: metrics, the dataset runner and the report.

``metrics`` needs only numpy; the runner imports the pipeline (and torch)
only when a model is run, and the report imports matplotlib only when it
draws, so reading scores stays cheap.
"""

from dannucnet.evaluate.metrics import (
    SCORE_NAMES,
    InstanceScores,
    PixelScores,
    instance_scores,
    pixel_scores,
    score_labels,
)
from dannucnet.evaluate.runner import EvaluationResult, ImageResult, evaluate_model

__all__ = [
    "SCORE_NAMES",
    "EvaluationResult",
    "ImageResult",
    "InstanceScores",
    "PixelScores",
    "evaluate_model",
    "instance_scores",
    "pixel_scores",
    "score_labels",
]
