"""Text queries for search: a sentence embedded by the CLIP text tower that matches a feature set.

This sits above the store on purpose. The store layer (``featurestore.store``) searches vectors only
and imports nothing from ``featurestore.encoders`` (which pulls in torch and open_clip, and whose spec
parser imports the store back): a test walks the store's imports and fails on any encoder import.
Here the sentence becomes a vector, ``store.search`` answers, and the result records what was asked.

The text tower is ``cliptext/<model>`` with the weights recorded in the store's class-feature
provenance of that model or, failing that, in the feature set's provenance (a tag, a checkpoint
identified by its SHA-256, or the random seed: ``@none`` builds the whole CLIP model under the seed,
so both towers match). Random weights are announced by the encoder and flagged in the result.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from featurestore._spec import SpecError, parse_spec
from featurestore.provenance import is_random_weights, weights_identity
from featurestore.store.class_features import WRITING

_ENCODERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # store -> {spec: encoder}


def search_text(store: Any, feature_set: str, text: str, k: int = 10, *, device: str = "cpu", **kwargs: Any) -> Any:
    """The ``k`` clips of ``feature_set`` nearest to the sentence ``text`` (a `SearchResult`).

    Args:
        store: an open `FeatureStore`.
        feature_set: a ``clip/<model>`` embedding set.
        text: the sentence; several sentences are several searches.
        device: where the text tower runs.
        kwargs: passed to ``store.search`` (``method``, ``nprobe``).

    Raises:
        ValueError: a feature set without a CLIP text tower, or a checkpoint other than the recorded one.
    """
    info = store.feature_info(feature_set)  # UnknownFeatureError naming the stored sets
    vector, spec, random = text_vector(store, info, text, device)
    result = store.search(feature_set, vector, k, **kwargs)
    result.query = {"text": text, "encoder": spec}
    result.random_weights = result.random_weights or random
    return result


def text_encoder_spec(store: Any, info: Any) -> str:
    """The ``cliptext/<model>@<weights>`` spec matching a ``clip/<model>`` feature set.

    The store's class features say which text tower went with the image tower: first a set made by
    ``cliptext/<model>`` with the same weights (whatever its name: a store may hold two weight
    choices of one model, ``vit_random=clip/ViT-B-32@none``), then, for the default-named
    ``clip/<model>`` set, the ``cliptext/<model>`` class features when they may pair with it (a
    checkpoint file on either side, see `_may_pair`); otherwise the weights come from the feature
    set's own provenance.
    """
    prov = info.provenance or {}
    spec = parse_spec(str(prov.get("encoder") or info.name))
    if spec.family != "clip" or not spec.model:
        raise ValueError(f"feature set {info.name!r} was made by {prov.get('encoder') or info.name!r}, which has "
                         f"no CLIP text tower; text queries need a clip/<model> feature set")
    text_name = f"cliptext/{spec.model}"
    towers = {name: p for name, p in _class_feature_provenances(store).items()
              if _spec_name(p.get("encoder")) == text_name}
    same = [p for p in towers.values() if prov.get("weights") and weights_identity(p) == weights_identity(prov)]
    if same:
        return str(same[0]["encoder"])
    default = towers.get(text_name, {})
    if info.name == spec.name and default.get("encoder") and _may_pair(prov, default):
        return str(default["encoder"])
    return f"{text_name}@{_weights_text(prov.get('weights') or {}, spec.weights, info.name)}"


def _class_feature_provenances(store: Any) -> dict[str, dict]:
    """The provenance of every finished class-feature set, from its attributes alone.

    Only which encoder and weights made each set matters here: reading each set's values
    (``get_class_features``) cost a read per set and made a damaged chunk in an unrelated set
    (another model's prompts) break every text query. A set whose write began after it was listed
    (marked ``writing``) is passed over, as ``class_feature_sets`` passes over unfinished ones.
    """
    found = {}
    for name in store.class_feature_sets():
        attrs = store.arrays.attrs(f"class_features/{name}")
        if not attrs.get(WRITING):
            found[name] = attrs.get("provenance") or {}
    return found


def _may_pair(image: dict, text: dict) -> bool:
    """Whether a text tower of other weights than the image set's may still be its partner: when
    the image set records no weights, or either side is a checkpoint file (a text tower tuned to
    frozen image weights). Two pretrained tags (``openai``/``laion2b_...``), or random weights
    against anything else, are two trainings with two embedding spaces: a sentence embedded by the
    one ranks the other's clips by noise, with nothing flagged."""
    kinds = {(image.get("weights") or {}).get("kind"), (text.get("weights") or {}).get("kind")}
    return not image.get("weights") or "file" in kinds


def _spec_name(encoder: Any) -> str | None:
    """``cliptext/ViT-B-32`` of ``cliptext/ViT-B-32@openai``; None for anything that is not a spec."""
    try:
        return parse_spec(str(encoder)).name if encoder else None
    except SpecError:
        return None


def _weights_text(weights: dict, fallback: str | None, name: str) -> str:
    kind = weights.get("kind")
    if kind == "random":
        seed = int(weights.get("seed", 0))
        return "none" if seed == 0 else f"none:{seed}"
    if kind == "pretrained" and weights.get("tag"):
        return str(weights["tag"])
    if kind == "file" and weights.get("path"):
        return str(weights["path"])
    if fallback:
        return fallback
    raise ValueError(f"feature set {name!r}: its provenance does not say which weights made it "
                     f"({weights or 'nothing recorded'}), so no matching text tower can be built")


def text_vector(store: Any, info: Any, text: str, device: str = "cpu") -> tuple[np.ndarray, str, bool]:
    """Embed ``text`` with the matching text tower: (vector, the encoder spec, random weights)."""
    from featurestore.encoders import create_encoder  # torch and open_clip: only when a sentence is asked

    spec = text_encoder_spec(store, info)
    recorded = (info.provenance or {}).get("weights") or {}
    memo = _ENCODERS.setdefault(store, {})
    encoder = memo.get(spec)
    if encoder is None:
        encoder = create_encoder(spec, device=device)  # announces random weights itself
        memo[spec] = encoder
    built = encoder.weights_provenance()
    if recorded.get("kind") == "file" and built.get("sha256") != recorded.get("sha256"):
        raise ValueError(f"text tower {spec}: checkpoint sha256 {built.get('sha256')} differs from the "
                         f"{recorded.get('sha256')} recorded with feature set {info.name!r}")
    vector = encoder.encode_text([text])[0].cpu().numpy()
    return vector, encoder.spec, is_random_weights({"weights": built})
