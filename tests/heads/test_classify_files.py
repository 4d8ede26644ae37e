"""``featurestore.encode_files``: rebuilding a feature set's encoder from its provenance, and encoding files
exactly as extraction stored them (checkpoints identified by sha256, random weights by their seed).

These test a featurestore module; they live with the heads classify tests that motivated it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.clip_files import ClipFiles, FilesError, group_files
from featurestore.encode_files import EncoderRebuildError, FileEncoder, rebuild_encoder, recorded_options
from featurestore.encoders import WeightsMismatchError, WeightsNotFoundError, create_encoder
from featurestore.extract import extract
from featurestore.store import open_store

from tests.heads._extracted import DEMO, FRAMES, files_of

CKPT_SET = "timm/test_resnet"


def _save_weights(path, seed: int):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint_store(tmp_path_factory):
    """Four clips' frames extracted with a checkpoint-weighted encoder."""
    from featurestore.demo import make_demo_dataset

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ckpt")
    root = make_demo_dataset(tmp / "dataset", **{**DEMO, "clips_per_class": 1})
    ckpt = _save_weights(tmp / "weights.safetensors", seed=1)
    store = tmp / "store.zarr"
    assert extract(root, store, f"timm/test_resnet@{ckpt}", frames=FRAMES, limit=4, num_workers=0,
                   progress=False).exit_code == 0
    return root, store, ckpt


def test_a_checkpoint_encoder_is_rebuilt_from_the_recorded_file_and_encodes_as_extraction_did(checkpoint_store):
    root, store_path, _ = checkpoint_store
    with open_store(store_path) as store:
        ids = store.clip_ids[:4]
        info = store.feature_info(CKPT_SET)
        stored = store.get_many(CKPT_SET, ids)
    encoder = FileEncoder({CKPT_SET: info.provenance}, "cpu")
    assert encoder.random_weights == [] and encoder.weights_identity[CKPT_SET].startswith("file:")
    out = encoder.encode(files_of(root, ids, audio=False))
    assert out.ok.all() and out.features[CKPT_SET].dtype == np.float16
    np.testing.assert_array_equal(out.features[CKPT_SET], stored)  # bit for bit: same decode, batch and cast


def test_a_moved_checkpoint_is_found_again_by_path_and_other_weights_are_refused(checkpoint_store, tmp_path):
    root, store_path, ckpt = checkpoint_store
    with open_store(store_path) as store:
        provenance = store.feature_info(CKPT_SET).provenance
        ids = store.clip_ids[:2]
        stored = store.get_many(CKPT_SET, ids)
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(ckpt.read_bytes())
    was = str(tmp_path / "gone.safetensors")  # as if the store had recorded a place the file has left
    gone = {**provenance, "encoder": f"timm/test_resnet@{was}", "weights": {**provenance["weights"], "path": was}}
    with pytest.raises(WeightsNotFoundError, match=f"--checkpoint {CKPT_SET}=PATH"):
        FileEncoder({CKPT_SET: gone}, "cpu")
    encoder = FileEncoder({CKPT_SET: gone}, "cpu", checkpoints={CKPT_SET: moved})
    np.testing.assert_array_equal(encoder.encode(files_of(root, ids, audio=False)).features[CKPT_SET], stored)
    other = _save_weights(tmp_path / "other.safetensors", seed=2)
    with pytest.raises(WeightsMismatchError, match="refusing to encode with other weights"):
        FileEncoder({CKPT_SET: provenance}, "cpu", checkpoints={CKPT_SET: other})


def test_random_weights_rebuild_from_their_seed_and_say_so():
    made = create_encoder("timm/test_resnet@none:3")
    provenance = {**made.provenance(), "segments": {"kind": "frames", "n_frames": 2}}
    encoder = FileEncoder({"v": provenance}, "cpu")
    assert encoder.random_weights == ["v"] and encoder.weights_identity == {"v": "RANDOM(seed=3)"}
    rebuilt = encoder.targets[0].encoder
    for a, b in zip(made.module.state_dict().values(), rebuilt.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encoder_options_are_rebuilt_and_other_configurations_refused():
    made = create_encoder("logmel", n_mels=64)
    provenance = {**made.provenance(), "segments": {"kind": "audio", "n_segments": 1, "segment_seconds": 1.0,
                                                    "sample_rate": 48000}}
    assert rebuild_encoder("logmel", provenance).output_shape == (64, 94)  # options found from the config
    asked = {**create_encoder("logmel", n_mels=32).provenance(), "runtime": {"request": {"options": {"n_mels": 32}}}}
    assert recorded_options(asked) == {"n_mels": 32}  # as extraction records how an encoder was asked for
    assert rebuild_encoder("logmel", asked).output_shape == (32, 94)
    frames = create_encoder("timm/test_resnet@none")
    changed = frames.provenance()
    changed["config"] = {**changed["config"], "preprocess": {**changed["config"]["preprocess"], "crop": [99, 99]}}
    with pytest.raises(EncoderRebuildError, match="config.preprocess: recorded"):
        rebuild_encoder("timm/test_resnet", changed)


def test_files_are_grouped_into_clips_by_stem(tmp_path):
    for name in ("a/x.wav", "b/x.mp4", "y.flac", "z.MKV"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    clips = group_files([tmp_path / "a/x.wav", tmp_path / "y.flac", tmp_path / "b/x.mp4", tmp_path / "z.MKV"])
    assert clips == [ClipFiles("x", tmp_path / "a/x.wav", tmp_path / "b/x.mp4"), ClipFiles("y", tmp_path / "y.flac"),
                     ClipFiles("z", None, tmp_path / "z.MKV")]
    with pytest.raises(FilesError, match="two audio files"):
        group_files([tmp_path / "a/x.wav", tmp_path / "a/x.wav"])
    with pytest.raises(FilesError, match="2 file\\(s\\) not found"):
        group_files([tmp_path / "no.wav", tmp_path / "none.mp4"])
