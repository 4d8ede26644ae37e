"""The log-mel CNN: its input pipeline, augmentation on/off, and backbone weights from a checkpoint or cache."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import heads
from featurestore.encoders import WeightsNotFoundError
from heads.backbones import create_backbone

SMALL = dict(backbone="test_resnet", n_classes=3, input_shape=[20, 16], resize_to=[32, 24], freq_mask_width=6)


def test_images_are_three_channels_resized():
    head = heads.create_head("spectrogram_cnn", **SMALL).eval()
    x = torch.randn(2, 20, 16)
    images = head.images(x)
    assert images.shape == (2, 3, 32, 24)
    assert head([x]).shape == (2, 3)


def test_augmentation_only_in_training():
    head = heads.create_head("spectrogram_cnn", **SMALL)
    x = torch.randn(4, 20, 16) * 10 - 40
    head.eval()
    assert torch.equal(head.images(x), head.images(x))
    head.train()
    torch.manual_seed(0)
    a = head.images(x)
    assert not torch.equal(a, head.images(x))
    masked_rows = (a == 0).all(dim=3).all(dim=1)  # [B, mels]: bins zeroed in every channel and frame
    assert masked_rows.any()


def test_augmentation_can_be_switched_off():
    head = heads.create_head("spectrogram_cnn", **{**SMALL, "gain_db": 0.0, "freq_mask_width": 0})
    head.train()
    x = torch.randn(4, 20, 16)
    # BatchNorm in training mode normalises by batch statistics: same input, same output
    assert torch.allclose(head.images(x), head.images(x))


def test_wrong_input_shape_is_named():
    head = heads.create_head("spectrogram_cnn", **SMALL)
    with pytest.raises(ValueError, match=r"\(20, 16\)"):
        head([torch.randn(2, 20, 15)])


def test_random_weights_are_seeded():
    a = heads.create_head("spectrogram_cnn", **SMALL, seed=1).backbone.state_dict()
    b = heads.create_head("spectrogram_cnn", **SMALL, seed=1).backbone.state_dict()
    c = heads.create_head("spectrogram_cnn", **SMALL, seed=2).backbone.state_dict()
    key = next(k for k in a if k.endswith("weight"))
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert heads.create_head("spectrogram_cnn", **SMALL).backbone_weights() == {"kind": "random", "seed": 0}


def test_local_checkpoint_is_loaded_except_a_differently_sized_classifier(tmp_path):
    source, _ = create_backbone("test_resnet", "random", num_classes=7, seed=5)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    head = heads.create_head("spectrogram_cnn", **SMALL, weights=str(path))
    record = head.backbone_weights()
    assert record["kind"] == "file" and len(record["sha256"]) == 64 and record["skipped"] > 0
    own, src = head.backbone.state_dict(), source.state_dict()
    conv = next(k for k in src if "conv" in k and k.endswith("weight"))
    assert torch.equal(own[conv], src[conv])
    assert own["fc.weight"].shape[0] == 3  # classifier kept at n_classes, not loaded


def test_a_training_checkpoint_with_nesting_and_module_prefix_loads(tmp_path):
    """A torch trainer's file ({"epoch", "model_state_dict": {"module.*": ...}}) is read like the encoders read it."""
    source, _ = create_backbone("test_resnet", "random", num_classes=3, seed=4)
    path = tmp_path / "trainer.pth"
    torch.save({"epoch": 7, "model_state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    head = heads.create_head("spectrogram_cnn", **SMALL, weights=str(path))
    assert head.backbone_weights()["skipped"] == 0
    for key, value in source.state_dict().items():
        assert torch.equal(head.backbone.state_dict()[key], value), key


def test_pretrained_weights_come_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg("test_resnet").hf_hub_id  # timm/test_resnet.<tag>
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    source, _ = create_backbone("test_resnet", "random", num_classes=1000, seed=9)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    net, record = create_backbone("test_resnet", "pretrained", num_classes=3)
    assert record["kind"] == "pretrained" and record["tag"] == "timm:test_resnet"
    conv = next(k for k in source.state_dict() if "conv" in k and k.endswith("weight"))
    assert torch.equal(net.state_dict()[conv], source.state_dict()[conv])


def test_missing_pretrained_weights_give_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("FEATURESTORE_ALLOW_DOWNLOAD", raising=False)  # no network attempt without it
    # a usage error (exit 2 on the command line), never a RuntimeError, which means a real torch failure
    with pytest.raises(WeightsNotFoundError, match="not in the local cache.*FEATURESTORE_ALLOW_DOWNLOAD.*weights='random'"):
        heads.create_head("spectrogram_cnn", **SMALL, weights="pretrained")
    with pytest.raises(FileNotFoundError, match="no such file"):
        heads.create_head("spectrogram_cnn", **SMALL, weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="not a timm model"):
        heads.create_head("spectrogram_cnn", **{**SMALL, "backbone": "no_such_net"})
