"""timm backbones for heads, with explicit weights: random (seeded), a local checkpoint, or a pretrained tag.

No machine here reaches a model hub, so ``pretrained`` only works when the weights are already in the
local Hugging Face / timm cache; otherwise the error says so and names the alternatives. Whatever was
loaded is described by a provenance-style ``weights`` record, so predictions can say plainly when a
backbone was random.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurestore.encoders import (
    ALLOW_DOWNLOAD_ENV, WeightsNotFoundError, downloads_allowed, file_sha256, read_state_dict,
)

RANDOM = "random"
PRETRAINED = "pretrained"


def create_backbone(model: str, weights: str, *, num_classes: int, in_chans: int = 3, seed: int = 0,
                    **kwargs: Any) -> tuple[nn.Module, dict]:
    """A timm model and the record of its weights.

    Args:
        model: timm model name (``regnety_064``, ``tf_efficientnet_b1.ns_jft_in1k``, ``test_resnet``).
        weights: ``"random"`` (initialised under ``torch.manual_seed(seed)``), ``"pretrained"`` (timm's
            default tag), ``"pretrained:<tag>"`` (``model.<tag>``), or a path to a ``.safetensors`` /
            ``.pth`` / ``.pt`` / ``.bin`` checkpoint (classifier weights of another shape are skipped).
        num_classes: size of the classifier timm builds.
        in_chans: input channels.
        seed: seed of the random initialisation (also of the classifier when loading a checkpoint).

    Returns:
        ``(module, weights_record)`` where the record is ``{"kind": "random", "seed": ...}``,
        ``{"kind": "pretrained", "tag": ...}`` or ``{"kind": "file", "path": ..., "sha256": ...}``.
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
    """Pretrained timm weights: from the local HF / torch-hub cache; timm's download only when allowed."""
    import timm

    tag = weights.partition(":")[2]
    name = f"{model.split('.')[0]}.{tag}" if tag else model
    cached = cached_pretrained_file(name)
    if cached is not None:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        record = load_checkpoint_into(net, cached)
        return net, {"kind": "pretrained", "tag": f"timm:{name}", "sha256": record["sha256"]}
    hint = ("put the weights in the local Hugging Face or torch-hub cache, pass a local checkpoint path "
            "as weights=..., or use weights='random' (results are then NOT pretrained)")
    if not downloads_allowed():  # the same policy as the encoders: no network unless asked for
        raise WeightsNotFoundError(f"pretrained weights for timm model {name!r} are not in the local cache "
                           f"(downloads are off; set {ALLOW_DOWNLOAD_ENV}=1 to allow them): {hint}")
    try:
        net = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as exc:  # hub errors come in many types; all mean "not available here"
        raise WeightsNotFoundError(f"could not load pretrained weights for timm model {name!r} "
                           f"({type(exc).__name__}: {exc}); no network? {hint}") from exc
    return net, {"kind": "pretrained", "tag": f"timm:{name}"}


def cached_pretrained_file(name: str) -> Path | None:
    """The locally cached pretrained weights file of timm model ``name`` (``arch[.tag]``), if any."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        found = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if found.is_file():
            return found
    return None


def load_checkpoint_into(net: nn.Module, path: Path) -> dict:
    """Load a local checkpoint into ``net`` (shape-mismatched keys such as another classifier are skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {str(path)!r}: no such file (expected 'random', 'pretrained', "
                                f"'pretrained:<tag>' or a checkpoint path)")
    state = read_state_dict(path)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise ValueError(f"checkpoint {str(path)!r} has no tensor matching the model's parameters "
                         f"(first keys: {list(state)[:5]}, model keys: {list(own)[:5]})")
    net.load_state_dict(usable, strict=False)
    return {"kind": "file", "path": str(path), "sha256": file_sha256(path), "loaded": len(usable),
            "skipped": len(own) - len(usable)}
