"""CLIP image and text encoders: paper model dims, preprocessing, weights, prompts, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.encoders import (
    ClipTextEncoder,
    SpecError,
    WeightsMismatchError,
    WeightsNotFoundError,
    create_encoder,
)
from featurestore.encoders._weights import file_sha256

open_clip = pytest.importorskip("open_clip")


# ===================================================================== the paper's three image encoders
@pytest.mark.parametrize("model, dim, size", [("RN50x4", 640, 288), ("RN101", 512, 224), ("ViT-B-32", 512, 224)])
def test_paper_clip_models_output_dims(model: str, dim: int, size: int, shared_encoder, smooth_frames) -> None:
    enc = shared_encoder(f"clip/{model}@none")
    batch = enc.preprocessor()(smooth_frames(1, 120, 160))
    assert batch.shape == (1, 3, size, size)
    out = enc.encode(batch)
    assert enc.output_shape == (dim,) and out.shape == (1, dim)
    assert enc.name == f"clip/{model}" and enc.spec == f"clip/{model}@none"
    config = enc.provenance()["config"]
    # random weights still get the architecture and preprocessing of the default (OpenAI) weights
    assert config["quick_gelu"] is True and config["normalized"] is False
    assert config["preprocess"]["interpolation"] == "bicubic"
    assert config["preprocess"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_preprocessing_matches_open_clip_transform(shared_encoder, smooth_frames) -> None:
    enc = shared_encoder("clip/ViT-B-32@none")
    cfg = enc.module.preprocess_cfg
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
    frames = smooth_frames(2, 360, 640)  # downscaling, 16:9, like decoded video frames
    batch = enc.preprocessor()(frames)
    for frame, ours in zip(frames, batch):
        ref = transform(Image.fromarray(frame))
        assert (ours - ref).abs().max() < 0.03
        assert (ours - ref).abs().mean() < 0.002


def test_default_weights_are_openai_and_missing_ones_say_what_to_do(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("FEATURESTORE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsNotFoundError) as info:
        create_encoder("clip/RN101")
    message = str(info.value)
    assert message.startswith("clip/RN101@openai: pretrained weights 'openai' for RN101 are not available locally")
    assert str(tmp_path / "hub" / "models--timm--resnet101_clip.openai") in message
    assert "'clip/RN101@none'" in message and "'clip/RN101@/path/to/checkpoint.pt'" in message
    with pytest.raises(SpecError, match=r"no pretrained tag 'laion2b'.*openai"):
        create_encoder("clip/RN101@laion2b")


# ===================================================================== a tiny CLIP for the weight paths
def _tiny_source(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


def test_same_spec_twice_identical_and_towers_of_one_model(tiny_clip, smooth_frames) -> None:
    frames = smooth_frames(2, 48, 64)
    a, b = create_encoder(f"clip/{tiny_clip}@none"), create_encoder(f"clip/{tiny_clip}@none")
    assert torch.equal(a.encode(a.preprocessor()(frames)), b.encode(b.preprocessor()(frames)))
    assert a.provenance() == b.provenance()
    # @none builds the whole CLIP model under seed 0: image and text towers belong together
    reference = _tiny_source(tiny_clip, seed=0)
    text = create_encoder(f"cliptext/{tiny_clip}@none")
    tokens = open_clip.get_tokenizer(tiny_clip)(["a photo of a bus."])
    with torch.no_grad():
        torch.testing.assert_close(text.encode_text(["a photo of a bus."]), reference.encode_text(tokens))
        batch = a.preprocessor()(frames)
        torch.testing.assert_close(a.encode(batch), reference.encode_image(batch))


def test_whole_model_checkpoint(tiny_clip, tmp_path, smooth_frames) -> None:
    source = _tiny_source(tiny_clip, seed=3)
    path = tmp_path / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": source.state_dict()}, path)
    enc = create_encoder(f"clip/{tiny_clip}@{path}")
    batch = enc.preprocessor()(smooth_frames(2, 40, 40))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(batch), source.encode_image(batch))
    assert enc.provenance()["weights"] == {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path)}
    text = create_encoder(f"cliptext/{tiny_clip}@{path}")
    prompts = text.class_prompts(["street_traffic"])
    with torch.no_grad():
        expected = source.encode_text(open_clip.get_tokenizer(tiny_clip)(prompts))
    torch.testing.assert_close(text.encode_text(prompts), expected)


def test_image_tower_only_checkpoint(tiny_clip, tmp_path, smooth_frames) -> None:
    source = _tiny_source(tiny_clip, seed=4)
    path = tmp_path / "visual.safetensors"
    from safetensors.torch import save_file

    save_file({f"visual.{k}": v.contiguous() for k, v in source.visual.state_dict().items()}, str(path))
    enc = create_encoder(f"clip/{tiny_clip}@{path}")
    batch = enc.preprocessor()(smooth_frames(1, 40, 40))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(batch), source.encode_image(batch))
    with pytest.raises(WeightsMismatchError, match="missing keys"):  # the text encoder needs its tower
        create_encoder(f"cliptext/{tiny_clip}@{path}")


def test_checkpoint_of_another_architecture_is_refused(tiny_clip, tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, path)
    with pytest.raises(WeightsMismatchError, match="other.pt"):
        create_encoder(f"clip/{tiny_clip}@{path}")


def test_no_default_weights_needs_an_explicit_choice(tiny_clip) -> None:
    with pytest.raises(SpecError, match="no default pretrained weights.*@none"):
        create_encoder(f"clip/{tiny_clip}")


# ===================================================================== text encoder
def test_class_prompts_and_text_encoding(tiny_clip) -> None:
    enc = create_encoder(f"cliptext/{tiny_clip}@none")
    assert enc.modality == "text" and enc.sample_rate is None
    prompts = enc.class_prompts(["airport", "street_pedestrian", "metro_station"])
    assert prompts == ["a photo of a airport.", "a photo of a street pedestrian.", "a photo of a metro station."]
    out = enc.encode_text(prompts)
    assert out.shape == (3, 32) and enc.output_shape == (32,)
    assert not torch.allclose(out[0], out[1])
    assert enc.provenance()["config"]["template"] == "a photo of a {}."
    custom = create_encoder(f"cliptext/{tiny_clip}@none", template="a {} scene")
    assert custom.class_prompts(["park"]) == ["a park scene"]
    with pytest.raises(SpecError, match="exactly one"):
        ClipTextEncoder(f"cliptext/{tiny_clip}@none", template="no placeholder")
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode_text("a photo of a bus.")


def test_zero_shot_with_tied_towers_prefers_the_matching_prompt(tiny_clip) -> None:
    """Sanity of the raw-embedding convention: cosine similarity of a text with itself is maximal."""
    enc = create_encoder(f"cliptext/{tiny_clip}@none")
    emb = enc.encode_text(enc.class_prompts(["bus", "park", "tram"]))
    unit = emb / emb.norm(dim=-1, keepdim=True)
    sims = unit @ unit.T
    assert torch.equal(sims.argmax(dim=1), torch.arange(3))
    assert not np.allclose(emb.norm(dim=-1).numpy(), 1.0)  # stored raw, not normalised


def test_random_init_is_announced_once_by_us_not_by_open_clip(tiny_clip, tmp_path, caplog, capsys) -> None:
    """open_clip's own "initialized randomly" log would be wrong for '@file' (loaded right after)."""
    path = tmp_path / "tiny.pt"
    torch.save(_tiny_source(tiny_clip, seed=5).state_dict(), path)  # open_clip itself logs here
    caplog.clear()
    with caplog.at_level("WARNING"):
        create_encoder(f"clip/{tiny_clip}@{path}")
        create_encoder(f"clip/{tiny_clip}@none:11")
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    assert f"clip/{tiny_clip}@none:11 uses RANDOM weights" in capsys.readouterr().err
