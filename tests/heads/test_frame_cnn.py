"""frame_cnn: the input pipeline and augmentation, Table 5's parameter counts, and training on stored frames."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import heads
from featurestore.store import open_store
from heads.train import shuffle_clips
from tests.heads._store import CLASSES, _manifest

from featurestore.store import create_store

RECIPES = Path(__file__).resolve().parents[2] / "scripts" / "recipes" / "paper"
SMALL = dict(backbone="test_resnet", n_classes=4, input_shape=[3, 32, 32])
FRAMES = "frames/32"


def test_images_are_normalised_and_only_augmented_in_training():
    head = heads.create_head("frame_cnn", **SMALL).eval()
    x = torch.full((2, 3, 32, 32), 255.0)
    images = head.images(x)
    expected = (1.0 - torch.tensor(head.cfg.mean)) / torch.tensor(head.cfg.std)
    torch.testing.assert_close(images[0, :, 5, 5], expected)
    assert head([x]).shape == (2, 4)
    assert torch.equal(head.images(x), head.images(x))
    head.train()
    torch.manual_seed(0)
    frames = torch.rand(6, 3, 32, 32) * 255
    same = frames[:1].repeat(6, 1, 1, 1)
    augmented = head.images(same)
    # every frame gets its own random draw, not one per batch
    assert len({tuple(a.flatten()[:50].tolist()) for a in augmented}) == 6
    from heads.frame_cnn import AugmentParams

    params = AugmentParams.draw(head.cfg, same[:2])
    assert params.angle[0] != params.angle[1] and params.scale[0] != params.scale[1]
    assert params.sigma[0] != params.sigma[1]
    off = heads.create_head("frame_cnn", **SMALL, augment=False).train()
    assert torch.equal(off.images(frames), off.eval().images(frames))


def test_the_batched_augmentation_equals_torchvisions_transforms_for_the_same_parameters():
    """RandomAffine (nearest, zero fill), ColorJitter, GaussianBlur(11) and RandomErasing, per frame in
    torchvision's functional API vs the head's batched versions, on a non-square batch."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from heads.frame_cnn import affine, color_jitter, erase_boxes, gaussian_blur

    torch.manual_seed(0)
    x = torch.rand(3, 3, 24, 30)
    angle, scale = torch.tensor([7.3, -4.1, 0.0]), torch.tensor([0.77, 1.31, 1.0])
    shift = torch.tensor([[3.0, -2.0], [0.0, 4.0], [-1.0, 0.0]])
    sigma = torch.tensor([0.3, 1.1, 1.9])
    jitter = torch.tensor([[1.2, 0.8, 1.3, 0.05], [0.7, 1.1, 0.9, -0.1], [1.0, 1.0, 1.0, 0.0]])
    boxes = torch.tensor([[2, 3, 5, 7], [0, 0, 0, 0], [10, 20, 14, 10]])
    moved, blurred = affine(x, angle, shift, scale), gaussian_blur(x, sigma, 11)
    jittered, erased = color_jitter(x, jitter, [0.4, 0.4, 0.4, 0.1]), erase_boxes(x, boxes)
    for i in range(3):
        ref = TF.affine(x[i], angle=float(angle[i]), translate=[int(v) for v in shift[i]], scale=float(scale[i]),
                        shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST)
        assert (moved[i] == ref).float().mean() > 0.99  # float rounding may move a sample at a pixel edge
        torch.testing.assert_close(blurred[i], TF.gaussian_blur(x[i], [11, 11], [float(sigma[i])] * 2))
        b, c, s, h = (float(v) for v in jitter[i])
        ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), s), h)
        torch.testing.assert_close(jittered[i], ref, atol=1e-5, rtol=0)
        top, left, height, width = (int(v) for v in boxes[i])
        ref = TF.erase(x[i], top, left, height, width, torch.zeros(1, 1, 1)) if height else x[i]
        assert torch.equal(erased[i], ref)


def test_per_frame_parameters_are_drawn_from_torchvisions_distributions():
    """Two-sample KS tests of the head's batched draws against torchvision's own per-call draws
    (RandomAffine, GaussianBlur, RandomErasing with the paper's settings), and their ranges."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import v2

    from heads.frame_cnn import AugmentParams, FrameCNNConfig

    cfg, n, frame = FrameCNNConfig(**SMALL), 4000, torch.zeros(3, 32, 32)
    torch.manual_seed(1)
    ours = AugmentParams.draw(cfg, torch.zeros(n, 3, 32, 32))
    affine_tv, blur_tv = v2.RandomAffine(10, (0.1, 0.1), (0.5, 1.5)), v2.GaussianBlur(11, (0.1, 2.0))
    erase_tv = v2.RandomErasing(p=1.0)
    theirs = [affine_tv.make_params([frame]) for _ in range(800)]
    boxes = [erase_tv.make_params([frame]) for _ in range(800)]
    checks = {"angle": (ours.angle, [t["angle"] for t in theirs]),
              "tx": (ours.shift[:, 0], [t["translate"][0] for t in theirs]),
              "scale": (ours.scale, [t["scale"] for t in theirs]),
              "sigma": (ours.sigma, [blur_tv.make_params([frame])["sigma"][0] for _ in range(800)]),
              "erased height": (ours.boxes[ours.boxes[:, 2] > 0, 2].float(), [b["h"] for b in boxes]),
              "erased top": (ours.boxes[ours.boxes[:, 2] > 0, 0].float(), [b["i"] for b in boxes])}
    for name, (mine, ref) in checks.items():
        assert ks_2samp(mine.numpy(), np.asarray(ref, dtype=float)).pvalue > 1e-3, name
    assert ours.angle.abs().max() <= 10 and set(ours.shift.unique().tolist()) <= set(range(-3, 4))
    assert 0.5 <= ours.scale.min() and ours.scale.max() <= 1.5 and 0.1 <= ours.sigma.min() and ours.sigma.max() <= 2
    assert abs(float((ours.boxes[:, 2] > 0).float().mean()) - 0.5) < 0.05  # erasing_p 0.5
    top, left, height, width = ours.boxes.T
    assert bool(((top + height <= 32) & (left + width <= 32)).all())


def test_resize_to_image_size_and_wrong_shapes_are_named():
    head = heads.create_head("frame_cnn", **SMALL, image_size=48).eval()
    assert head.images(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        head([torch.zeros(1, 3, 16, 16)])
    with pytest.raises(ValueError, match="square RGB frames"):
        heads.create_head("frame_cnn", **{**SMALL, "input_shape": [32, 32]})


@pytest.mark.parametrize("recipe, millions", [("V01_frame_cnn_regnetx_064.json", 24.60),
                                               ("V02_frame_cnn_resnest50d.json", 25.45),
                                               ("V03_frame_cnn_hrnet_w18.json", 19.27)])
def test_paper_recipes_have_table_5_parameter_counts(recipe, millions):
    """Table 5 of the paper: V01 24.60M, V02 25.45M, V03 19.27M learned parameters (10 classes)."""
    cfg = json.loads((RECIPES / recipe).read_text())
    assert cfg["head"] == "frame_cnn" and cfg["batch_size"] == 20 and cfg["epochs"] == 20
    config = {**cfg["head_config"], "weights": "random", "n_classes": 10, "input_shape": [3, 448, 448]}
    head = heads.create_head("frame_cnn", **config)  # random init: no download
    n = sum(p.numel() for p in head.parameters() if p.requires_grad)
    assert round(n / 1e6, 2) == millions


def frames_store(path: Path, n_clips: int = 32, segments: int = 2, seed: int = 0) -> Path:
    """A store whose frames feature set holds class-coloured noisy 32x32 frames (uint8)."""
    rng = np.random.default_rng(seed)
    store = create_store(path, _manifest(n_clips))
    labels = np.asarray(store.labels, dtype=np.int64)
    colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], dtype=float)
    data = colours[labels][:, None, :, None, None] + rng.normal(0, 40, (n_clips, segments, 3, 32, 32))
    prov = {"encoder": FRAMES, "config": {"modality": "video"}, "weights": {"kind": "parameter-free"}}
    store.create_feature_set(FRAMES, segments, (3, 32, 32), prov, dtype="uint8", chunk_clips=4)
    store.write_rows(FRAMES, 0, data.clip(0, 255).astype(np.uint8))
    store.close()
    return path


def test_trains_on_stored_frames_and_predicts_per_clip(tmp_path):
    path = frames_store(tmp_path / "frames.zarr")
    cfg = heads.TrainConfig(head="frame_cnn", features=[FRAMES], train_split="train", val_split="val",
                            out=str(tmp_path / "run"), head_config={"backbone": "test_resnet"}, epochs=2,
                            batch_size=8, lr=0.05, lr_milestones=[], device="cpu", progress=False)
    with open_store(path) as store:
        result = heads.train(cfg, store)
    assert result.epochs_completed == 2 and result.best_val_accuracy is not None
    out = heads.predict(path, tmp_path / "run", device="cpu")
    with open_store(path) as store:
        probs = store.get_predictions("run")
        attrs = store.prediction_runs()["run"]
    assert probs.shape == (32, 2, 4) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    assert attrs["head"] == "frame_cnn" and attrs["family"] == "video" and attrs["random_weights"]
    assert out is not None


def test_shuffle_window_is_capped_by_bytes_for_frames_only(tmp_path):
    path = frames_store(tmp_path / "frames.zarr")
    with open_store(path) as store:
        frame_head = heads.create_head("frame_cnn", **SMALL)
        cfg = heads.TrainConfig(head="frame_cnn", features=[FRAMES], shuffle_buffer=2048)
        per_clip = 2 * 3 * 32 * 32
        assert shuffle_clips(cfg, store, frame_head) == min(2048, frame_head.max_read_group_bytes // per_clip)
        frame_head.max_read_group_bytes = 10 * per_clip
        assert shuffle_clips(cfg, store, frame_head) == 10
    other = heads.create_head("embedding_mlp", input_dims=[8], n_classes=4)
    assert shuffle_clips(cfg, None, other) == 2048  # other heads: as configured


def test_learns_class_colours(tmp_path):
    path = frames_store(tmp_path / "frames.zarr", n_clips=48)
    cfg = heads.TrainConfig(head="frame_cnn", features=[FRAMES], train_split="train", val_split="val",
                            out=str(tmp_path / "run"), epochs=3, batch_size=8, lr=0.05, lr_milestones=[],
                            head_config={"backbone": "test_resnet", "augment": False}, device="cpu",
                            progress=False)
    with open_store(path) as store:
        result = heads.train(cfg, store)
    assert result.best_val_accuracy > 1 / len(CLASSES) + 0.2


def test_frozen_alternatives_parse_and_use_what_reproduce_extracts_with_frozen_video():
    import sys

    sys.path.insert(0, str(RECIPES.parents[1]))
    import reproduce_dcase2021 as reproduce

    extracted = {s.split("@")[0] for s in reproduce.FROZEN_ENCODERS.split(",")}
    recipes = sorted((RECIPES.parent / "frozen").glob("*.json"))
    assert [p.name[:3] for p in recipes] == ["V01", "V02", "V03"]
    for path in recipes:
        cfg = heads.TrainConfig.from_json(path)
        assert cfg.head == "embedding_mlp" and set(cfg.features) <= extracted
        assert cfg.out.endswith("_frozen") and "NOT the paper's method" in json.loads(path.read_text())["description"]
