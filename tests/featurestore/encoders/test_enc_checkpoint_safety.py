"""Checkpoints are data: no TorchScript, no pickled callables, and one-line errors when keys do not fit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featurestore.encoders import WeightsMismatchError, WeightsNotFoundError, create_encoder, read_state_dict

open_clip = pytest.importorskip("open_clip")


class _Scripted(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` runs (and prints) while the archive is loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("TORCHSCRIPT CODE RAN")
        self.w = state[0]
        self.training = state[1]


class _Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: what a hostile ``.pt`` file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
def test_torchscript_archive_is_refused_and_its_code_never_runs(tmp_path, capfd, monkeypatch) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Scripted()), str(path))
    torch.jit.load(str(path))  # the archive is live: loading it runs its __setstate__
    assert "TORCHSCRIPT CODE RAN" in capfd.readouterr().out

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load was called on a checkpoint")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    with pytest.raises(WeightsMismatchError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "TorchScript" in message
    assert "state_dict()" in message and "safetensors" in message
    with pytest.raises(WeightsMismatchError, match="TorchScript"):
        create_encoder(f"timm/test_resnet@{path}")
    assert "TORCHSCRIPT CODE RAN" not in capfd.readouterr().out


def test_pickle_with_a_reduce_payload_is_refused_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "extra": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickle writes the marker
    assert marker.exists()
    marker.unlink()
    for load in (lambda: read_state_dict(path), lambda: create_encoder(f"timm/test_resnet@{path}")):
        with pytest.raises(WeightsMismatchError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "refused" in message and "exec" in message
        assert not marker.exists()


def test_unreadable_checkpoints_give_one_line(tmp_path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not safetensors at all")
    with pytest.raises(WeightsMismatchError) as info:
        read_state_dict(garbage)
    assert "\n" not in str(info.value) and str(garbage) in str(info.value)
    zipped = tmp_path / "half.pt"
    torch.save({"w": torch.zeros(1000)}, zipped)
    zipped.write_bytes(zipped.read_bytes()[:300])
    with pytest.raises(WeightsMismatchError, match="could not be read") as info:
        read_state_dict(zipped)
    assert "\n" not in str(info.value)


# ===================================================================== key mismatches on one line
def _tiny_source(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


def test_wrong_key_prefix_is_one_line_naming_both_sides(tiny_clip, tmp_path) -> None:
    state = _tiny_source(tiny_clip, seed=6).state_dict()
    path = tmp_path / "prefixed.pt"
    torch.save({f"model.{k}": v for k, v in state.items()}, path)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder(f"clip/{tiny_clip}@{path}")
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000 and str(path) in message
    assert "expected keys like" in message and "found ['model." in message
    assert "extra prefix 'model.'" in message


def test_wrong_shapes_are_one_line(tmp_path) -> None:
    import timm

    path = tmp_path / "wide.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    narrow = tmp_path / "narrow.pth"
    state = torch.load(path, weights_only=True)
    torch.save({k: (v[:1] if v.ndim else v) for k, v in state.items()}, narrow)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder(f"timm/test_resnet@{narrow}")
    message = str(info.value)
    assert "\n" not in message and "keys with another shape" in message and "in the checkpoint" in message


@pytest.mark.parametrize("prefixed", [True, False])
def test_image_tower_alone_loads_with_or_without_its_prefix(prefixed, tiny_clip, tmp_path, smooth_frames) -> None:
    from safetensors.torch import save_file

    source = _tiny_source(tiny_clip, seed=7)
    path = tmp_path / "tower.safetensors"
    prefix = "visual." if prefixed else ""
    save_file({prefix + k: v.contiguous() for k, v in source.visual.state_dict().items()}, str(path))
    enc = create_encoder(f"clip/{tiny_clip}@{path}")
    batch = enc.preprocessor()(smooth_frames(1, 40, 40))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(batch), source.encode_image(batch))


def test_open_clips_download_log_line_does_not_reach_the_terminal(tmp_path, monkeypatch, capfd, caplog) -> None:
    import logging

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("FEATURESTORE_ALLOW_DOWNLOAD", raising=False)
    root_handlers = list(logging.getLogger().handlers)
    with caplog.at_level("INFO"), pytest.raises(WeightsNotFoundError) as info:
        create_encoder("clip/RN50@openai")
    assert "\n" not in str(info.value)
    assert not [r for r in caplog.records if "Failed to download" in r.getMessage()]
    assert "Failed to download" not in capfd.readouterr().err
    assert logging.getLogger().handlers == root_handlers  # no basicConfig side effect
