"""Hostile checks of the CNN heads (`frame_cnn`, `spectrogram_cnn`): weights identified by content,
and no silent change of what the backbone sees (normalisation, precision, deltas, augmentation)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import heads
from featurestore.encoders import _content_hash
from featurestore.provenance import file_sha256
from heads.backbones import create_backbone

timm = pytest.importorskip("timm")

FRAMES = dict(backbone="test_resnet", n_classes=4, input_shape=[3, 32, 32])
LOGMEL = dict(backbone="test_resnet", n_classes=3, input_shape=[20, 16], resize_to=[32, 24], freq_mask_width=6)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own hash cache and memo; downloads off unless a test turns them on."""
    monkeypatch.setenv("FEATURESTORE_HASH_CACHE", str(tmp_path / "hash-cache" / "sha256.json"))
    monkeypatch.delenv("FEATURESTORE_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(_content_hash, "_MEMO", {})


def _weights_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    return path


# ===================================================================== 1. pretrained weights by content
def test_weights_timm_downloads_are_recorded_by_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repro: 'pretrained' weights that timm downloads (a URL, not in the HF cache) were recorded by tag
    only, so two runs on other weights under one tag had one identity and resumed into each other."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.setenv("FEATURESTORE_ALLOW_DOWNLOAD", "1")
    records = []
    for seed in (1, 2):
        source = _weights_file(tmp_path / f"weights-{seed}.pth", seed)
        overlay = {"hf_hub_id": "", "url": source.as_uri()}  # a file:// URL: timm's real download code path
        net, record = create_backbone("test_resnet", "pretrained", num_classes=3, pretrained_cfg_overlay=overlay)
        assert record == {"kind": "pretrained", "tag": "timm:test_resnet", "sha256": file_sha256(source)}
        conv = "conv1.0.weight" if "conv1.0.weight" in net.state_dict() else next(iter(net.state_dict()))
        assert torch.equal(net.state_dict()[conv], torch.load(source)[conv])
        records.append(record)
    assert records[0] != records[1]


# ===================================================================== 2. normalisation of stored frames
def test_frames_are_normalised_with_the_backbone_own_statistics() -> None:
    """Repro: frame_cnn normalised with ImageNet's mean/std whatever the backbone, so a backbone
    pretrained on 0.5/0.5 inputs (test_resnet here; inception_v3.tf_in1k, ViTs) saw shifted images."""
    head = heads.create_head("frame_cnn", **FRAMES).eval()
    own = head.backbone.pretrained_cfg
    assert head.cfg.mean == list(own["mean"]) == [0.5, 0.5, 0.5] and head.cfg.std == list(own["std"])
    white = torch.full((1, 3, 32, 32), 255.0)
    torch.testing.assert_close(head.images(white)[0, :, 4, 4], torch.ones(3))  # (1 - 0.5) / 0.5
    recorded = head.config_dict()  # run.json holds the numbers, and a loaded run uses them
    assert recorded["mean"] == [0.5, 0.5, 0.5] and recorded["std"] == [0.5, 0.5, 0.5]
    regnet = heads.create_head("frame_cnn", **{**FRAMES, "backbone": "regnetx_002"})
    assert regnet.cfg.mean == [0.485, 0.456, 0.406] and regnet.cfg.std == [0.229, 0.224, 0.225]
    given = heads.create_head("frame_cnn", **FRAMES, mean=[0.1, 0.2, 0.3]).eval()
    assert given.cfg.mean == [0.1, 0.2, 0.3] and given.cfg.std == [0.5, 0.5, 0.5]


# ===================================================================== 3. bf16 runs: the inputs stay float32
def _backbone_input(head: torch.nn.Module, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    """What the backbone receives from ``head([batch])``, with the trainer's bf16 autocast or without."""
    seen = []
    hook = head.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            head([batch])
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("name, config, batch", [
    ("frame_cnn", {**FRAMES, "input_shape": [3, 64, 64]}, lambda: torch.randint(0, 256, (4, 3, 64, 64)).float()),
    ("spectrogram_cnn", LOGMEL, lambda: torch.randn(4, 20, 16) * 12 - 50),
])
def test_bf16_autocast_changes_only_the_backbone_not_its_input(name, config, batch) -> None:
    """Repro: ``precision: bf16`` ran the augmentation and the deltas under autocast: the affine grid in
    bfloat16 moved nearest-neighbour samples (inputs off by up to ~0.3 after normalisation) and the deltas
    lost ~1% of their range, so a bf16 run trained on other images, not just with coarser arithmetic."""
    torch.manual_seed(0)
    head, x = heads.create_head(name, **config).train(), batch()
    fp32, bf16 = _backbone_input(head, x, False), _backbone_input(head, x, True)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=1e-5, atol=1e-5)


# ===================================================================== 4. guards of what already holds
def test_deltas_run_along_time_with_edges_replicated() -> None:
    """A log-mel rising 2 dB per frame and 100 dB per mel band: delta 2 everywhere (time, not frequency),
    edges included; delta-delta 0."""
    from heads.deltas import delta_kernels, with_deltas

    t = torch.arange(16.0).view(1, 1, 16)
    m = torch.arange(20.0).view(1, 20, 1)
    stacked = with_deltas(2 * t + 100 * m, delta_kernels(9))
    torch.testing.assert_close(stacked[:, 1], torch.full((1, 20, 16), 2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(stacked[:, 2], torch.zeros(1, 20, 16), atol=1e-4, rtol=0)


def test_same_seed_same_augmentation_and_none_at_eval() -> None:
    frames = torch.randint(0, 256, (3, 3, 32, 32)).float()
    head = heads.create_head("frame_cnn", **FRAMES).train()
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(head.images(frames))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    head.eval()
    plain = (frames / 255 - head.mean) / head.std
    torch.testing.assert_close(head.images(frames), plain)
    spec = heads.create_head("spectrogram_cnn", **LOGMEL).eval()
    logmel = torch.randn(3, 20, 16)
    torch.manual_seed(1)
    first = spec.images(logmel)
    torch.manual_seed(2)
    assert torch.equal(first, spec.images(logmel))


# ===================================================================== 5. a checkpoint of another architecture
def test_a_checkpoint_of_a_sibling_architecture_is_refused_not_half_loaded(tmp_path: Path) -> None:
    """Repro: resnet10t's weights given to a resnet14t head loaded every tensor whose name and shape
    matched and left the rest random, silently (the record only counted them as 'skipped')."""
    from featurestore.encoders import WeightsMismatchError

    torch.manual_seed(0)
    sibling = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=5).state_dict(), sibling)
    with pytest.raises(WeightsMismatchError, match=r"resnet10t.pth' does not fit backbone resnet14t: \d+ of its "
                                                   r"tensors would stay random .*only the classifier may differ"):
        create_backbone("resnet14t", str(sibling), num_classes=3)
    own, _ = create_backbone("test_resnet", "random", num_classes=7, seed=1)
    state = dict(own.state_dict())
    extra = tmp_path / "extra.pth"
    torch.save({**state, "layer9.conv.weight": torch.zeros(2)}, extra)
    with pytest.raises(WeightsMismatchError, match=r"1 of the file's would be dropped \(first: 'layer9.conv.weight'"):
        create_backbone("test_resnet", str(extra), num_classes=3)
    same = tmp_path / "same-architecture.pth"
    torch.save(state, same)
    _, record = create_backbone("test_resnet", str(same), num_classes=3)  # only the 7-class classifier differs
    assert record["kind"] == "file" and record["skipped"] == 2


# ===================================================================== 6. frames stored as floats
def test_a_float_frames_set_is_refused_not_divided_by_255(writable_store) -> None:
    """Repro: frames of shape [3, S, S] stored as float 0..1 (a resized-and-scaled export) passed the
    shape check and were divided by 255 again: near-black images, trained on without a word."""
    from heads.frame_cnn import FrameCNN
    from tests.heads._store import FRAMES_SHAPE, SEGMENTS

    n_clips = len(writable_store.labels)
    writable_store.create_feature_set("scaled/16", SEGMENTS, FRAMES_SHAPE, {"encoder": "scaled/16", "config": {
        "modality": "video"}, "weights": {"kind": "parameter-free"}}, dtype="float32", chunk_clips=16)
    writable_store.write_rows("scaled/16", 0, torch.rand(n_clips, SEGMENTS, *FRAMES_SHAPE).numpy())
    with pytest.raises(ValueError, match=r"feature set 'scaled/16' is stored as float32; frame_cnn reads uint8"):
        FrameCNN.store_config([writable_store.feature_info("scaled/16")], 4)
    config = FrameCNN.store_config([writable_store.feature_info("frames/16")], 4)
    assert config == {"input_shape": list(FRAMES_SHAPE), "n_classes": 4}


# ===================================================================== 7. a transposed log-mel set
def test_a_log_mel_stored_time_first_is_refused(writable_store) -> None:
    """Repro: a log-mel set stored [frames, n_mels] (another tool's layout) passed the 2-D check, and the
    deltas, taken along the last axis, ran along frequency, silently."""
    from heads.spectrogram_cnn import SpectrogramCNN
    from tests.heads._store import LOGMEL_SHAPE, SEGMENTS

    n_mels, frames = LOGMEL_SHAPE
    n_clips = len(writable_store.labels)
    prov = {"encoder": "logmel", "config": {"modality": "audio", "n_mels": n_mels}, "weights": {"kind": "parameter-free"}}
    writable_store.create_feature_set("logmel-t", SEGMENTS, (frames, n_mels), prov, chunk_clips=16)
    writable_store.write_rows("logmel-t", 0, torch.randn(n_clips, SEGMENTS, frames, n_mels).numpy())
    with pytest.raises(ValueError, match=r"'logmel-t' has per-segment shape \[16, 20\] but its provenance says "
                                         r"n_mels=20: spectrogram_cnn needs \[n_mels, frames\]"):
        SpectrogramCNN.store_config([writable_store.feature_info("logmel-t")], 4)
    assert SpectrogramCNN.store_config([writable_store.feature_info("logmel")], 4)["input_shape"] == [n_mels, frames]
