"""timm backbones for heads, with explicit weights: random (seeded), a local checkpoint, or a pretrained tag.

No machine here reaches a model hub, so ``pretrained`` only works when the weights are already in the
local Hugging Face / timm cache (or downloads are allowed); otherwise the error says so and names the
alternatives. Whatever was loaded is described by a provenance-style ``weights`` record, identified by
content (sha256) where it came from a file, so predictions can say plainly when a backbone was random
and runs on other weights under one tag are told apart.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurestore.encoders import (
    ALLOW_DOWNLOAD_ENV, WeightsMismatchError, WeightsNotFoundError, downloads_allowed, read_state_dict,
)
from featurestore.encoders._content_hash import cached_sha256, loaded_weights_hash, recording_loaded_files
from featurestore.encoders._weights import hub_offline

RANDOM = "random"
PRETRAINED = "pretrained"


def create_backbone(model: str, weights: str, *, num_classes: int, in_chans: int = 3, seed: int = 0,
                    **kwargs: Any) -> tuple[nn.Module, dict]:
    """A timm model and the record of its weights.

    Args:
        model: timm model name (``regnety_064``, ``tf_efficientnet_b1.ns_jft_in1k``, ``test_resnet``).
        weights: ``"random"`` (initialised under ``torch.manual_seed(seed)``), ``"pretrained"`` (timm's
            default tag), ``"pretrained:<tag>"`` (``model.<tag>``), or a path to a ``.safetensors`` /
            ``.pth`` / ``.pt`` / ``.bin`` checkpoint (only the classifier may be absent or of another shape).
        num_classes: size of the classifier timm builds.
        in_chans: input channels.
        seed: seed of the random initialisation (also of the classifier when loading a checkpoint).

    Returns:
        ``(module, weights_record)`` where the record is ``{"kind": "random", "seed": ...}``,
        ``{"kind": "pretrained", "tag": ..., "sha256": ...}`` (of the file timm read) or
        ``{"kind": "file", "path": ..., "sha256": ..., "loaded": ..., "skipped": ...}``.
    """
    import timm

    if not timm.is_model(model.split(".")[0]):
        raise ValueError(f"{model!r} is not a timm model name (see timm.list_models())")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if weights == RANDOM:
            net = timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
            return net, {"kind": "random", "seed": seed}
        if weights == PRETRAINED or weights.startswith(PRETRAINED + ":"):
            return _pretrained(model, weights, num_classes, in_chans, **kwargs)
        net = timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return net, load_checkpoint_into(net, Path(weights))


def _pretrained(model: str, weights: str, num_classes: int, in_chans: int, **kwargs: Any) -> tuple[nn.Module, dict]:
    """Pretrained timm weights through timm's own loader (its key filters and classifier handling),
    from the local HF / torch-hub cache, downloading only when allowed.

    Whichever source timm read, the record carries the sha256 of the file it loaded (the encoders'
    `recording_loaded_files`), so two runs on other weights under one tag differ in their identity
    (a resume refuses them) and a run's provenance names its weights by content, not by tag.
    """
    import timm

    tag = weights.partition(":")[2]
    name = f"{model.split('.')[0]}.{tag}" if tag else model
    try:
        with hub_offline(), recording_loaded_files() as files:
            net = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as exc:  # hub errors come in many types; all mean "not available here"
        hint = ("put the weights in the local Hugging Face or torch-hub cache, pass a local checkpoint path "
                "as weights=..., or use weights='random' (results are then NOT pretrained)")
        said = (str(exc).strip().splitlines() or [""])[0][:200]  # one line, whatever the hub library wrote
        if not downloads_allowed():  # the same policy as the encoders: no network unless asked for
            raise WeightsNotFoundError(f"pretrained weights for timm model {name!r} are not in the local cache "
                                       f"(downloads are off; set {ALLOW_DOWNLOAD_ENV}=1 to allow them): {hint} "
                                       f"[{type(exc).__name__}: {said}]") from exc
        raise WeightsNotFoundError(f"could not load pretrained weights for timm model {name!r} "
                                   f"({type(exc).__name__}: {said}); no network? {hint}") from exc
    _, sha256 = loaded_weights_hash(files, net)
    return net, {"kind": "pretrained", "tag": f"timm:{name}", "sha256": sha256}


def load_checkpoint_into(net: nn.Module, path: Path) -> dict:
    """Load a local checkpoint into ``net``; only the classifier may be left out or of another shape.

    Why so strict: a checkpoint of a sibling architecture (resnet34's into resnet18, resnet50's into
    resnet34) shares many key names and shapes, so loading what matches would give a backbone that
    is part file, part random, while the record still named the file. Such a file is refused.
    """
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {str(path)!r}: no such file (expected 'random', 'pretrained', "
                                f"'pretrained:<tag>' or a checkpoint path)")
    state = read_state_dict(path)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise WeightsMismatchError(f"checkpoint {str(path)!r} has no tensor matching the model's parameters "
                                   f"(first keys: {list(state)[:5]}, model keys: {list(own)[:5]})")
    _refuse_partial(net, path, state, usable)
    net.load_state_dict(usable, strict=False)
    return {"kind": "file", "path": str(path), "sha256": cached_sha256(path), "loaded": len(usable),
            "skipped": len(own) - len(usable)}


def _refuse_partial(net: nn.Module, path: Path, state: dict[str, torch.Tensor], usable: dict) -> None:
    """Refuse a checkpoint that leaves a non-classifier tensor of ``net`` unloaded, or holds one ``net`` lacks."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or ()
    prefixes = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))

    def matters(key: str) -> bool:
        return not key.startswith(prefixes) and not key.endswith("num_batches_tracked")

    own = net.state_dict()
    unloaded = [k for k in own if k not in usable and matters(k)]
    foreign = [k for k in state if k not in own and matters(k)]
    if not unloaded and not foreign:
        return
    first = unloaded[0] if unloaded else foreign[0]
    if first not in own:
        found = "absent from the model"
    elif first not in state:
        found = "absent from the file"
    else:
        found = f"{list(own[first].shape)} in the model, {list(state[first].shape)} in the file"
    raise WeightsMismatchError(
        f"checkpoint {str(path)!r} does not fit backbone {cfg.get('architecture') or type(net).__name__}: {len(unloaded)} of its tensors "
        f"would stay random and {len(foreign)} of the file's would be dropped (first: {first!r}, {found}); "
        f"only the classifier may differ: pass a checkpoint of this architecture")


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: a head's input pipeline (augmentation, deltas, normalisation) runs in
    float32 even in a bf16 run, and only the backbone runs under the trainer's autocast.

    Why: under bfloat16 autocast the affine grid (8 bits of mantissa: ~1 px at 448 px) moved the
    nearest-neighbour samples of the frame augmentation and the delta convolution lost ~1% of the
    deltas' range, so ``--precision bf16`` changed the images themselves, not only the backbone's
    arithmetic.
    """
    return torch.autocast(device_type=device.type, enabled=False)
