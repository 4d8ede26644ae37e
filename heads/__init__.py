"""Trainable heads on stored features: the paper's classifiers, one trainer, prediction into the store.

Public API::

    heads.list_heads()                       # registered head names
    heads.create_head("late_fusion", input_dims=[640, 512, 512], n_classes=10)
    heads.train(heads.TrainConfig(...))      # -> TrainResult (a run directory with checkpoints)
    heads.predict(store, "runs/c04")         # -> writes predictions/<run>/probs into the store
    heads.load_head("runs/c04")              # -> (trained head, run.json)

``heads.train`` and ``heads.predict`` are the functions; their modules are ``heads.train`` /
``heads.predict`` in ``sys.modules`` (import names from them with ``from heads.train import fit``).
"""
from heads._registry import Head, create_head, head_class, list_heads, make_config, register_head
from heads import embedding_mlp, frame_cnn, late_fusion, spectrogram_cnn, zero_shot  # noqa: F401  (registers the heads)
from heads.config import TrainConfig
from heads.errors import FeatureFingerprintError
from heads.predict import PredictResult, load_head, predict
from heads.train import TrainResult, fit, train

__all__ = [
    "FeatureFingerprintError", "Head", "PredictResult", "TrainConfig", "TrainResult", "create_head", "fit",
    "head_class", "list_heads", "load_head", "make_config", "predict", "register_head", "train",
]
