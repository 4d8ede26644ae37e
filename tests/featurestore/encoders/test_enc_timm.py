"""timm frame encoders: shapes, the model's own preprocessing, and every way of getting weights."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.encoders import (
    SpecError,
    TimmFrameEncoder,
    WeightsMismatchError,
    WeightsNotFoundError,
    create_encoder,
)
from featurestore.encoders._weights import file_sha256

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_model_data_config  # noqa: E402

TEST_MODELS = ["test_resnet", "test_efficientnet", "test_vit", "test_convnext"]


def reference_embedding(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """What timm itself returns as pooled pre-logit features."""
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(batch), pre_logits=True)


@pytest.mark.parametrize("model", TEST_MODELS)
def test_output_shape_and_preprocessing_follow_the_model(model: str, smooth_frames) -> None:
    enc = create_encoder(f"timm/{model}@none")
    frames = smooth_frames(2, 90, 120)
    batch = enc.preprocessor()(frames)
    out = enc.encode(batch)
    assert out.shape == (2, *enc.output_shape)
    transform = create_transform(**resolve_model_data_config(enc.module))
    for frame, ours in zip(frames, batch):
        ref = transform(Image.fromarray(frame))
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < 0.03, "preprocessing differs from timm's own eval transform"


def test_paper_models_resolve_preprocessing_without_building_weights() -> None:
    # data configs of the paper's video backbones (no weights are loaded to check them)
    for model, size in [("regnety_064", 224), ("resnest50d", 224), ("hrnet_w18", 224)]:
        cfg = timm.models.get_pretrained_cfg(model).to_dict()
        from featurestore.encoders.timm_frames import frame_preprocessor

        pre = frame_preprocessor(cfg)
        assert pre.crop == (size, size)
        assert pre.resize == int(size / cfg["crop_pct"])


def test_same_spec_twice_gives_identical_embeddings_and_provenance(smooth_frames) -> None:
    frames = smooth_frames(3, 64, 64)
    first, second = (create_encoder("timm/test_efficientnet@none") for _ in range(2))
    torch.manual_seed(123)  # the caller's RNG state must not matter
    a = first.encode(first.preprocessor()(frames))
    torch.manual_seed(456)
    b = second.encode(second.preprocessor()(frames))
    assert torch.equal(a, b)
    assert first.provenance() == second.provenance()
    assert first.provenance()["weights"] == {"kind": "random", "seed": 0}
    other_seed = create_encoder("timm/test_efficientnet@none:1")
    assert other_seed.spec == "timm/test_efficientnet@none:1"
    assert not torch.equal(a, other_seed.encode(other_seed.preprocessor()(frames)))


def test_random_weights_warning_is_printed_once(capsys) -> None:
    create_encoder("timm/test_byobnet@none")
    create_encoder("timm/test_byobnet@none")
    err = capsys.readouterr().err
    assert err.count("WARNING: timm/test_byobnet@none uses RANDOM weights: its features carry no pretrained "
                     "knowledge") == 1


def _source_model(seed: int, num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes).eval()


@pytest.mark.parametrize("layout", ["plain", "nested", "module-prefix", "safetensors"])
def test_checkpoint_file_loads_strictly_and_is_identified(layout: str, tmp_path, smooth_frames) -> None:
    source = _source_model(seed=1)
    state = source.state_dict()  # includes the classifier head, which the encoder drops
    path = tmp_path / ("ckpt.safetensors" if layout == "safetensors" else "ckpt.pth")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "nested":
        torch.save({"epoch": 3, "state_dict": state}, path)
    elif layout == "module-prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    enc = create_encoder(f"timm/test_resnet@{path}")
    batch = enc.preprocessor()(smooth_frames(2, 64, 80))
    torch.testing.assert_close(enc.encode(batch), reference_embedding(source, batch), rtol=1e-5, atol=1e-5)
    assert enc.spec == f"timm/test_resnet@{path.resolve()}"
    assert enc.provenance()["weights"] == {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}
    assert enc.name == "timm/test_resnet"


def test_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    path = tmp_path / "effnet.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="effnet.pth"):
        create_encoder(f"timm/test_resnet@{path}")


def test_non_strict_load_is_an_explicit_choice(tmp_path) -> None:
    state = _source_model(seed=2, num_classes=0).state_dict()
    state.pop("conv1.0.weight")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match="1 missing keys"):
        create_encoder(f"timm/test_resnet@{path}")
    enc = create_encoder(f"timm/test_resnet@{path}", strict=False)
    assert enc.provenance()["weights"]["kind"] == "file"


def test_not_a_state_dict_and_missing_files(tmp_path) -> None:
    path = tmp_path / "junk.pt"
    torch.save({"note": "hello"}, path)
    with pytest.raises(WeightsMismatchError, match="does not hold a state dict"):
        create_encoder(f"timm/test_resnet@{path}")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_encoder(f"timm/test_resnet@{tmp_path / 'absent.pth'}")


def test_pretrained_weights_missing_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("FEATURESTORE_ALLOW_DOWNLOAD", raising=False)
    offline_before, env_before = huggingface_hub.constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    with pytest.raises(WeightsNotFoundError) as info:
        create_encoder("timm/test_resnet")  # no @: the model's default tag
    message = str(info.value)
    assert "timm/test_resnet@r160_in1k: pretrained weights 'r160_in1k'" in message
    assert str(tmp_path / "empty-hub" / "models--timm--test_resnet.r160_in1k") in message
    assert "'timm/test_resnet@none'" in message and "@/path/to/checkpoint.pt" in message
    # the offline switch was only for that attempt
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline_before
    assert os.environ.get("HF_HUB_OFFLINE") == env_before


def test_pretrained_tag_loads_from_the_hub_cache(tmp_path, monkeypatch, smooth_frames) -> None:
    """A hub cache laid out as huggingface_hub leaves it is used, offline, by the tag path."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    source = _source_model(seed=5)
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    enc = create_encoder("timm/test_resnet@pretrained")
    assert enc.spec == "timm/test_resnet@r160_in1k"
    assert enc.provenance()["weights"] == {"kind": "pretrained", "tag": "r160_in1k",
                                           "path": str(snapshot / "model.safetensors"),
                                           "sha256": file_sha256(snapshot / "model.safetensors")}
    batch = enc.preprocessor()(smooth_frames(2, 64, 64))
    torch.testing.assert_close(enc.encode(batch), reference_embedding(source, batch), rtol=1e-5, atol=1e-5)
    same = create_encoder("timm/test_resnet.r160_in1k")  # timm's own naming is accepted too
    assert same.spec == enc.spec


def test_unknown_tag_lists_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"no pretrained tag 'imagenet'.*r160_in1k"):
        create_encoder("timm/test_resnet@imagenet")
    with pytest.raises(SpecError, match="give the tag once"):
        TimmFrameEncoder("timm/test_resnet.r160_in1k@none")


def test_preprocessor_rejects_wrong_frames() -> None:
    pre = create_encoder("timm/test_resnet@none").preprocessor()
    with pytest.raises(ValueError, match=r"expected uint8 RGB frames \[K, H, W, 3\], got float32"):
        pre(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(32, 32, 3\)"):
        pre(np.zeros((32, 32, 3), np.uint8))
