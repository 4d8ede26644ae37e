"""fusion: segment->clip aggregation, the paper's ensemble rules, calibration, metrics, reports.

Reads prediction runs from a feature store (``featurestore``); never imports ``heads``.
"""
from fusion.aggregate import AGGREGATORS, aggregate_segments, load_clip_probs
from fusion.calibration import (
    ConfidenceWeights, LeakageError, StackingCalibrator, TemperatureScaling, check_disjoint, make_calibrator,
)
from fusion.evaluate import Evaluation, evaluate_recipe
from fusion.metrics import (
    Scores, accuracy, classwise_accuracy, classwise_log_loss, confusion_matrix, log_loss, per_clip_log_loss,
    reliability, score,
)
from fusion.pipeline import FusionOutput, fuse, validate_recipe
from fusion.postprocess import PAPER_BANDS, ClampBands, clamp_eq1
from fusion.recipe import (
    Calibration, ClassWeights, FusionRecipe, PostProcess, RecipeError, Replacement,
)
from fusion.report import Report, write_report
from fusion.rules import (
    average_models, classwise_fuse, confidence_weights, replace_low_confidence, selection_weights,
)
from fusion.submission import Submission, read_submission, write_submission
from fusion.submit import submit_recipe

__all__ = [
    "AGGREGATORS", "PAPER_BANDS", "Calibration", "ClampBands", "ClassWeights", "ConfidenceWeights",
    "Evaluation", "FusionOutput", "FusionRecipe", "LeakageError", "PostProcess", "RecipeError", "Replacement",
    "Report", "Scores", "StackingCalibrator", "Submission", "TemperatureScaling", "accuracy",
    "aggregate_segments", "average_models", "check_disjoint", "clamp_eq1", "classwise_accuracy",
    "classwise_fuse", "classwise_log_loss", "confidence_weights", "confusion_matrix", "evaluate_recipe",
    "fuse", "load_clip_probs", "log_loss", "make_calibrator", "per_clip_log_loss", "read_submission",
    "reliability", "replace_low_confidence", "score", "selection_weights", "submit_recipe",
    "validate_recipe", "write_report", "write_submission",
]
