"""Hostile tests of where weights come from: offline URL downloads, pretrained content hashes, QuickGELU.

No hub is reachable here: URLs point at a closed port on 127.0.0.1, hub caches are laid out by the
tests as huggingface_hub leaves them, and open_clip tags of the tiny test model are added to its
pretrained table for the duration of a test.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from featurestore.encoders import SpecError, WeightsNotFoundError, create_encoder
from featurestore.encoders import _content_hash
from featurestore.encoders._content_hash import cached_sha256, loaded_weights_hash, recording_loaded_files
from featurestore.encoders._weights import DownloadRefusedError, hub_offline, parse_weights
from featurestore.provenance import file_sha256, fingerprint

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own hash cache file and an empty in-process memo; downloads off."""
    path = tmp_path / "hash-cache" / "sha256.json"
    monkeypatch.setenv("FEATURESTORE_HASH_CACHE", str(path))
    monkeypatch.delenv("FEATURESTORE_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(_content_hash, "_MEMO", {})
    return path


def _closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 whose port nothing listens on (connecting would fail with URLError)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


# ===================================================================== 1. URL downloads when offline
def test_hub_offline_refuses_torch_hub_timm_and_open_clip_url_downloads(tmp_path) -> None:
    url = _closed_port_url("weights-0123abcd.pth")
    downloads = {
        "torch.hub": lambda: torch.hub.load_state_dict_from_url(url, model_dir=str(tmp_path / "th")),
        "timm": lambda: timm.models._hub.download_cached_file(url, cache_dir=str(tmp_path / "timm")),
        "open_clip": lambda: open_clip.pretrained.download_pretrained_from_url(url, cache_dir=str(tmp_path / "oc")),
    }
    for name, download in downloads.items():
        with hub_offline(), pytest.raises(DownloadRefusedError) as info:
            download()
        assert str(info.value).startswith(f"download of {url} refused: downloads are off"), name
    # scoped: outside the block (and with downloads allowed) the libraries' own functions are back
    assert torch.hub.download_url_to_file.__module__ == "torch.hub"
    assert timm.models._hub.download_url_to_file is torch.hub.download_url_to_file
    assert open_clip.pretrained.urllib.request.urlopen.__module__ == "urllib.request"


def test_hub_offline_still_reads_a_cached_url_file(tmp_path) -> None:
    url = _closed_port_url("cached.pth")
    model_dir = tmp_path / "checkpoints"
    model_dir.mkdir()
    torch.save({"w": torch.arange(3.0)}, model_dir / "cached.pth")
    with hub_offline():
        state = torch.hub.load_state_dict_from_url(url, model_dir=str(model_dir), weights_only=True)
    assert torch.equal(state["w"], torch.arange(3.0))


def test_open_clip_url_tag_offline_is_one_clear_line(tiny_clip, monkeypatch) -> None:
    url = _closed_port_url("tiny-clip-url-only-9f8e7d.pt")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_clip, {"urlonly": {"url": url}})
    with pytest.raises(WeightsNotFoundError) as info:
        create_encoder(f"clip/{tiny_clip}@urlonly")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"clip/{tiny_clip}@urlonly: pretrained weights 'urlonly' for {tiny_clip} are not "
                              f"available locally")
    assert f"download of {url} refused" in message and "URLError" not in message
    assert f"'clip/{tiny_clip}@/path/to/checkpoint.pt'" in message


# ===================================================================== 2. content hash of pretrained weights
def _lay_out_timm_hub_cache(root: Path, seed: int) -> Path:
    """``models--timm--test_resnet.r160_in1k`` as huggingface_hub leaves it, weights of ``seed``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    source = timm.create_model("test_resnet", pretrained=False)
    repo = root / "models--timm--test_resnet.r160_in1k"
    snapshot = repo / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("b" * 40)
    path = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path


def test_replaced_hub_cache_changes_the_pretrained_fingerprint(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = _lay_out_timm_hub_cache(tmp_path / "hub", seed=1)
    first = create_encoder("timm/test_resnet@r160_in1k").provenance()
    assert first["weights"] == {"kind": "pretrained", "tag": "r160_in1k", "path": str(path),
                                "sha256": file_sha256(path)}
    _lay_out_timm_hub_cache(tmp_path / "hub", seed=2)  # the cache replaced: same tag, other weights
    second = create_encoder("timm/test_resnet@r160_in1k").provenance()
    assert second["weights"]["sha256"] == file_sha256(path) != first["weights"]["sha256"]
    assert fingerprint(first) != fingerprint(second)
    assert second["encoder"] == first["encoder"] == "timm/test_resnet@r160_in1k"


def test_random_weights_provenance_has_no_hash(tiny_clip) -> None:
    """Random-weight provenance is as before, so old stores' fingerprints for it stay valid."""
    assert create_encoder("timm/test_resnet@none").provenance()["weights"] == {"kind": "random", "seed": 0}
    assert create_encoder(f"clip/{tiny_clip}@none:3").provenance()["weights"] == {"kind": "random", "seed": 3}


def test_content_hash_is_cached_by_path_size_and_times(tmp_path, _private_hash_cache) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"first weights")
    assert cached_sha256(path) == file_sha256(path)
    table = json.loads(_private_hash_cache.read_text())
    (key,) = table
    assert key.startswith(f"{path.resolve()}|{len(b'first weights')}|")
    # an unchanged file is not read again: a (planted) cached value is what comes back
    _private_hash_cache.write_text(json.dumps({key: "f" * 64}))
    _content_hash._MEMO.clear()
    assert cached_sha256(path) == "f" * 64
    # a rewritten file is hashed afresh (its size, mtime or ctime moved), and the stale entry goes
    path.write_bytes(b"other weights, longer")
    assert cached_sha256(path) == file_sha256(path)
    assert list(json.loads(_private_hash_cache.read_text()).values()) == [file_sha256(path)]
    # a corrupt cache is ignored, never trusted
    _private_hash_cache.write_text("{not json")
    _content_hash._MEMO.clear()
    assert cached_sha256(path) == file_sha256(path)
    assert parse_weights(str(path), None, "timm/x").sha256 == file_sha256(path)


def test_loaded_files_are_recorded_and_identified(tmp_path) -> None:
    import safetensors.torch
    from safetensors.torch import save_file

    def load_file(path: str) -> dict:  # by attribute at call time, as timm and open_clip do
        return safetensors.torch.load_file(path)

    module = torch.nn.Linear(2, 2)
    save_file(module.state_dict(), str(tmp_path / "a.safetensors"))
    torch.save(module.state_dict(), tmp_path / "b.pt")
    with recording_loaded_files() as files:
        load_file(str(tmp_path / "a.safetensors"))
    assert files == [str(tmp_path / "a.safetensors")]
    assert loaded_weights_hash(files, module) == (files[0], file_sha256(tmp_path / "a.safetensors"))
    with recording_loaded_files() as both:
        torch.load(tmp_path / "b.pt", weights_only=True)
        load_file(str(tmp_path / "a.safetensors"))
    path, digest = loaded_weights_hash(both, module)
    assert path == f"{tmp_path / 'b.pt'}; {tmp_path / 'a.safetensors'}" and len(digest) == 64
    # no file seen (weights read some other way): the loaded tensors themselves are hashed
    path, digest = loaded_weights_hash([], module)
    other = torch.nn.Linear(2, 2)
    assert path == "(loaded tensors)" and digest != loaded_weights_hash([], other)[1]
    assert torch.load.__module__ == "torch.serialization"  # restored after the block


# ===================================================================== 3. QuickGELU of checkpoint files
def _tiny_with_tags(monkeypatch, name: str) -> None:
    """Give the tiny model two tags trained with different activations (like ViT-B-32's)."""
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {
        "quick": {"hf_hub": "nobody/quick/", "quick_gelu": True},
        "plain": {"hf_hub": "nobody/plain/"},
    })


def _source(name: str, quick_gelu: bool) -> torch.nn.Module:
    torch.manual_seed(7)
    return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu).eval()


def test_checkpoint_of_a_model_whose_tags_disagree_needs_the_activation_said(
        tiny_clip, tmp_path, monkeypatch, smooth_frames) -> None:
    _tiny_with_tags(monkeypatch, tiny_clip)
    path = tmp_path / "ckpt.pt"
    torch.save(_source(tiny_clip, quick_gelu=False).state_dict(), path)
    with pytest.raises(SpecError, match=r"cannot tell whether checkpoint .* QuickGELU .*quick.* or GELU .*plain.*"
                                        r"quick_gelu=True or quick_gelu=False"):
        create_encoder(f"clip/{tiny_clip}@{path}")
    frames = smooth_frames(2, 40, 40)
    outputs = {}
    for quick in (False, True):
        torch.save(_source(tiny_clip, quick_gelu=quick).state_dict(), path)
        enc = create_encoder(f"clip/{tiny_clip}@{path}", quick_gelu=quick)
        assert enc.config()["quick_gelu"] is quick
        batch = enc.preprocessor()(frames)
        with torch.no_grad():
            torch.testing.assert_close(enc.encode(batch), _source(tiny_clip, quick).encode_image(batch))
        outputs[quick] = fingerprint({**enc.provenance(), "weights": {"kind": "file", "sha256": "same"}})
    assert outputs[False] != outputs[True]  # the activation is in the fingerprint


def test_checkpoint_activation_read_from_open_clip_config_beside_it(tiny_clip, tmp_path, monkeypatch,
                                                                      smooth_frames) -> None:
    _tiny_with_tags(monkeypatch, tiny_clip)
    source = _source(tiny_clip, quick_gelu=True)
    torch.save(source.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    enc = create_encoder(f"clip/{tiny_clip}@{tmp_path / 'open_clip_pytorch_model.bin'}")
    assert enc.config()["quick_gelu"] is True
    batch = enc.preprocessor()(smooth_frames(1, 40, 40))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(batch), source.encode_image(batch))
    (tmp_path / "open_clip_config.json").write_text("[]")
    with pytest.raises(SpecError, match="open_clip_config.json: not an open_clip config"):
        create_encoder(f"cliptext/{tiny_clip}@{tmp_path / 'open_clip_pytorch_model.bin'}")


def test_quick_gelu_option_contradicting_tag_or_architecture_is_refused(tiny_clip, tmp_path, monkeypatch) -> None:
    _tiny_with_tags(monkeypatch, tiny_clip)
    with pytest.raises(SpecError, match="trained with QuickGELU; quick_gelu=False would give wrong embeddings"):
        create_encoder(f"clip/{tiny_clip}@quick", quick_gelu=False)
    path = tmp_path / "x.pt"
    path.write_bytes(b"not read: refused before")
    with pytest.raises(SpecError, match="RN50-quickgelu is a QuickGELU architecture"):
        create_encoder(f"clip/RN50-quickgelu@{path}", quick_gelu=False)
    with pytest.raises(SpecError, match="quick_gelu must be true or false"):
        create_encoder(f"clip/{tiny_clip}@none", quick_gelu="yes")


def test_real_model_with_disagreeing_tags_refuses_an_unlabelled_checkpoint(tmp_path) -> None:
    """ViT-B-32: 'openai' is QuickGELU, 'laion2b_s34b_b79k' GELU; refused before building anything."""
    path = tmp_path / "vit.pt"
    path.write_bytes(b"not read: refused before")
    with pytest.raises(SpecError, match=r"clip/ViT-B-32@.*cannot tell whether checkpoint"):
        create_encoder(f"clip/ViT-B-32@{path}")


# ===================================================================== 4. other weight-loading faults
def test_directory_given_as_checkpoint_says_so(tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError, match="is a directory, not a checkpoint file"):
        create_encoder(f"timm/test_resnet@{tmp_path}/")
    assert os.path.isdir(tmp_path)


def test_checkpoint_rewritten_after_it_was_hashed_is_refused(tmp_path) -> None:
    """The spec is resolved (and hashed) before the model is built; a file rewritten in between
    (a training job still saving) must not load under the first file's hash."""
    from featurestore.encoders._weights import WeightsMismatchError, read_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"w": torch.zeros(2)}, path)
    weights = parse_weights(str(path), None, "timm/x")
    assert torch.equal(read_checkpoint(weights)["w"], torch.zeros(2))
    torch.save({"w": torch.ones(2), "extra": torch.ones(1)}, path)
    with pytest.raises(WeightsMismatchError, match=r"last.pt changed after it was identified"):
        read_checkpoint(weights)
