"""Trainable heads on stored features: the paper's classifiers, one trainer, prediction into the store.

Public API::

    heads.list_heads()                       # registered head names
    heads.create_head("late_fusion", input_dims=[640, 512, 512], n_classes=10)
    heads.train(TrainConfig(...))            # -> TrainResult (run directory with checkpoints)
    heads.predict(store, "runs/c04")         # -> writes predictions/<run>/probs into the store
"""
from heads._registry import Head, create_head, head_class, list_heads, make_config, register_head
from heads import embedding_mlp, late_fusion, spectrogram_cnn, zero_shot  # noqa: F401  (register heads)

__all__ = ["Head", "create_head", "head_class", "list_heads", "make_config", "register_head"]
