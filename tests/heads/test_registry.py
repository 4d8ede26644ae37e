"""The registry, configs as data, and the paper's late-fusion network size."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import heads


def test_the_paper_heads_are_registered():
    assert {"late_fusion", "spectrogram_cnn", "embedding_mlp", "linear", "zero_shot"} <= set(heads.list_heads())


@pytest.mark.parametrize("name", heads.list_heads())
def test_config_round_trips_through_json(name, tmp_path):
    cls = heads.head_class(name).config_class
    cfg = cls()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert cls(**json.loads(path.read_text())) == cfg


def test_late_fusion_has_the_papers_parameter_count():
    head = heads.create_head("late_fusion", input_dims=[640, 512, 512], n_classes=10)
    assert sum(p.numel() for p in head.parameters()) == 1_350_282
    out = head.eval()([torch.randn(3, 640), torch.randn(3, 512), torch.randn(3, 512)])
    assert out.shape == (3, 10)


def test_late_fusion_branch_structure_follows_table_1():
    head = heads.create_head("late_fusion", input_dims=[640, 512, 512], n_classes=10)
    kinds = [type(m).__name__ for m in head.branches[0]]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert head.branches[0][3].p == 0.2 and head.fusion.in_features == 768 and head.fusion.out_features == 128


def test_late_fusion_refuses_the_wrong_number_of_inputs():
    head = heads.create_head("late_fusion", input_dims=[8, 8], n_classes=3)
    with pytest.raises(ValueError, match="2 input feature set"):
        head([torch.randn(2, 8)])


def test_unknown_head_and_unknown_field_are_named():
    with pytest.raises(KeyError, match="no head named 'nope'"):
        heads.create_head("nope")
    with pytest.raises(TypeError, match="hiddn"):
        heads.create_head("embedding_mlp", hiddn=[3])


def test_registering_a_name_twice_warns():
    cls = heads.head_class("linear")
    with pytest.warns(UserWarning, match="registered twice"):
        heads.register_head(cls)


def test_zero_shot_is_clip_cosine_similarity_times_100():
    head = heads.create_head("zero_shot", input_dims=[4], n_classes=2)
    text = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    head.set_class_embeddings(text)
    image = torch.tensor([[3.0, 4.0, 0, 0]])
    expected = 100 * torch.tensor([[0.6, 0.8]])
    assert torch.allclose(head([image]), expected)
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 0
    with pytest.raises(ValueError, match="expected"):
        head.set_class_embeddings(torch.zeros(3, 4))


def test_zero_shot_without_class_embeddings_says_what_to_do():
    head = heads.create_head("zero_shot", input_dims=[4], n_classes=2)
    with pytest.raises(RuntimeError, match="set_class_embeddings"):
        head([torch.randn(1, 4)])


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_smaller_above():
    from heads.losses import FocalLoss, make_loss

    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert torch.allclose(FocalLoss(0.0)(logits, target), ce)
    assert FocalLoss(2.0)(logits, target) < ce
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")
