"""Trainable heads on stored features: the paper's classifiers, one trainer, prediction into the store.

Public API::

    heads.list_heads()                       # registered head names
    heads.create_head("late_fusion", input_dims=[640, 512, 512], n_classes=10)
    heads.train(heads.TrainConfig(...))      # -> TrainResult (a run directory with checkpoints)
    heads.predict(store, "runs/c04")         # -> writes predictions/<run>/probs into the store
    heads.load_head("runs/c04")              # -> (trained head, run.json)
    heads.TrainedHead.load("runs/c04").predict_proba({"clip/RN101": x, ...})  # -> [n_clips, n_segments, C]
    heads.classify("runs/c04", ["x.wav", "x.mp4"])  # -> ClassifyResult (new files, through the run's encoders)
    heads.Classifier("runs/c04")             # -> head and encoders built once, .classify(files) many times
    heads.sweep(cfg, {"lr": [0.1, 0.01]}, seeds=[0, 1, 2], out="sweeps/x")  # -> SweepResult (mean +- std table)

``heads.train``, ``heads.predict``, ``heads.classify`` and ``heads.sweep`` are the functions; their modules are
``heads.train`` / ``heads.predict`` / ``heads.classify`` / ``heads.sweep`` in ``sys.modules`` (import names from them
with ``from heads.train import fit``).
"""
from heads._registry import Head, create_head, head_class, list_heads, make_config, register_head
from heads import embedding_mlp, frame_cnn, late_fusion, spectrogram_cnn, zero_shot  # noqa: F401  (registers the heads)
from heads.config import TrainConfig
from heads.errors import FeatureFingerprintError
from heads.predict import PredictResult, load_head, predict
from heads.train import TrainResult, fit, train
from heads.trained import TrainedHead
from heads.classify import Classifier, ClassifyResult, classify
from heads.sweep import SweepResult, sweep

__all__ = [
    "Classifier", "ClassifyResult", "FeatureFingerprintError", "Head", "PredictResult", "SweepResult", "TrainConfig",
    "TrainResult", "TrainedHead", "classify", "create_head", "fit", "head_class", "list_heads", "load_head",
    "make_config", "predict", "register_head", "sweep", "train",
]
