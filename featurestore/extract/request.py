"""What an extraction run asks for, read before any model is built: encoders, names and options.

``requests(encoders, encoder_options)`` turns the ``encoders`` argument of ``extract`` (a
comma-separated string, a list, or a mapping of feature-set names to specs) and the per-encoder
options into `EncoderRequest` objects, refusing a name asked for twice or an option for no encoder
of the run before anything is built. ``build`` builds them.

``encoder_options_argument`` and ``classes_argument`` read the same requests from command-line
text (``--encoder-option logmel.n_mels=128``, ``--classes a,b,c`` or ``--classes @FILE``).

``nothing_to_do`` answers "is every selected clip already done with exactly this request?" from
the store alone: the runtime record of each feature set says how its encoder was asked for (spec as
written, options) and with which library versions, so a rerun that asks the same under the same
versions would rebuild the very same encoder. Then a resume with nothing left exits without
importing torch or building a model. Anything it cannot tell this way (an encoder object given,
``overwrite``, another version, a clip not in the index, a feature set with undone rows) goes
through the full check, which builds the encoders and compares fingerprints.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore._spec import SpecError, parse_option, parse_spec, split_name
from featurestore.extract.summary import ExtractSummary, FeatureSetSummary
from featurestore.manifest import Manifest, check_classes
from featurestore.provenance import canonical_json, file_sha256, is_random_weights, runtime_info

#: ``ExtractSummary.device`` of a run that found nothing to do and built no encoder.
NO_DEVICE = "no device (nothing to do)"


@dataclass(frozen=True)
class EncoderRequest:
    """One encoder a run asks for.

    Attributes:
        name: the feature set it fills (chosen with ``NAME=SPEC``, else the spec without weights).
        spec: the spec as written, without ``NAME=`` (None for a ready encoder object).
        options: constructor options (``create_encoder(spec, **options)``).
        encoder: a ready ``Encoder`` the caller built itself (then ``spec`` is None).
        named: True when the name was chosen, not derived from the spec.
    """

    name: str
    spec: str | None
    options: dict = field(default_factory=dict)
    encoder: Any = None
    named: bool = False

    def matches_spec(self, text: str) -> bool:
        """Whether ``text`` names this request's encoder by spec (as written, canonical, or without weights)."""
        if self.spec is None:
            return False
        parsed = parse_spec(self.spec)
        return text in (self.spec, str(parsed), parsed.name)


def requests(encoders: str | Sequence | Mapping, encoder_options: Mapping[str, Mapping[str, Any]] | None = None
             ) -> list[EncoderRequest]:
    """The run's encoder requests, checked: names unique, every option aimed at one encoder.

    Args:
        encoders: ``"logmel,vit_random=clip/ViT-B-32@none"``, a list of such specs and/or Encoder
            objects, or a mapping ``{feature set name: spec or Encoder}``.
        encoder_options: ``{spec or feature set name: {option: value}}``.

    Raises:
        ValueError (SpecError): no encoders, a malformed spec or name, a feature-set name asked for
            twice, options for no encoder of the run (or for several, or for a ready encoder object).
    """
    items = _items(encoders)
    if not items:
        raise ValueError("no encoders given; e.g. --encoders logmel,clip/ViT-B-32@none")
    names = [r.name for r in items]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        specs = [r.spec or getattr(r.encoder, "spec", "?") for r in items if r.name in twice]
        raise ValueError(f"feature set(s) {twice} requested twice (specs {specs}); one run fills each name once; "
                         f"choose names with NAME=SPEC, e.g. 'vit_random=clip/ViT-B-32@none'")
    return _with_options(items, encoder_options or {})


def _items(encoders: str | Sequence | Mapping) -> list[EncoderRequest]:
    if isinstance(encoders, Mapping):
        _refuse_one_object_under_several_names(encoders)
        return [_named(str(name), value) for name, value in encoders.items()]
    listed = [s for s in encoders.split(",") if s.strip()] if isinstance(encoders, str) else list(encoders)
    out = []
    for item in listed:
        if isinstance(item, str):
            name, spec = split_name(item)
            out.append(EncoderRequest(name or parse_spec(spec).name, spec, named=name is not None))
        else:
            out.append(EncoderRequest(str(getattr(item, "name", "?")), None, encoder=item))
    return out


def _refuse_one_object_under_several_names(encoders: Mapping) -> None:
    """``{"a": enc, "b": enc}``: the name is set on the object itself, so the last one would win and
    the run would fill only ``b``, saying nothing of ``a``; refused naming them."""
    by_object: dict[int, list[str]] = {}
    for name, value in encoders.items():
        if not isinstance(value, str):
            by_object.setdefault(id(value), []).append(str(name))
    shared = next((names for names in by_object.values() if len(names) > 1), None)
    if shared:
        raise ValueError(f"feature sets {shared} are given one and the same Encoder object; a feature-set name "
                         f"is set on the object, so build one encoder per name (or give specs, which are built "
                         f"once per name)")


def _named(name: str, value: Any) -> EncoderRequest:
    """``{name: spec}`` / ``{name: Encoder}``: the name is the feature set's."""
    from featurestore._spec import check_feature_set_name

    check_feature_set_name(name)
    if isinstance(value, str):
        inner, spec = split_name(value)
        if inner is not None and inner != name:
            raise SpecError(f"encoder {name!r}: its spec {value!r} names another feature set ({inner!r})")
        return EncoderRequest(name, spec, named=True)
    value.name = name
    return EncoderRequest(name, None, encoder=value, named=True)


def _with_options(items: list[EncoderRequest], options: Mapping[str, Mapping[str, Any]]) -> list[EncoderRequest]:
    """Attach each ``{target: {key: value}}`` to the one request it names."""
    merged: dict[int, dict] = {}
    for target, values in options.items():
        index = _target_index(items, str(target))
        if items[index].encoder is not None:
            raise ValueError(f"encoder option for {target!r}: that encoder was passed already built; "
                             f"give its options to create_encoder instead")
        if not isinstance(values, Mapping):
            raise ValueError(f"encoder options for {target!r} must be a mapping of option names to values, "
                             f"got {type(values).__name__}")
        merged.setdefault(index, {}).update(values)
    return [EncoderRequest(r.name, r.spec, {**r.options, **merged.get(i, {})}, r.encoder, r.named)
            for i, r in enumerate(items)]


def _target_index(items: list[EncoderRequest], target: str) -> int:
    """The request an option names: by feature-set name first, else by spec (exactly one)."""
    by_name = [i for i, r in enumerate(items) if r.name == target]
    if by_name:
        return by_name[0]
    by_spec = [i for i, r in enumerate(items) if r.matches_spec(target)]
    if len(by_spec) == 1:
        return by_spec[0]
    listing = ", ".join(r.name if r.spec is None or r.spec == r.name else f"{r.name} ({r.spec})" for r in items)
    if by_spec:
        raise ValueError(f"encoder option for {target!r}: {len(by_spec)} encoders of this run match it "
                         f"({', '.join(items[i].name for i in by_spec)}); name it by feature set")
    raise ValueError(f"encoder option for {target!r}: no encoder of this run is called that; this run's "
                     f"encoders: {listing}")


def build(items: list[EncoderRequest], device: Any) -> list:
    """The encoders, built (ready objects are used as they are) and named."""
    from featurestore.encoders import create_encoder

    built = []
    for item in items:
        if item.encoder is not None:
            built.append(item.encoder)
            continue
        encoder = create_encoder(item.spec, device, **item.options)
        if item.named:
            encoder.name = item.name
        built.append(encoder)
    return built


# ---------------------------------------------------------------------- command-line text
def encoder_options_argument(values: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["logmel.n_mels=128", ...]`` (repeated ``--encoder-option``) -> ``{"logmel": {"n_mels": 128}}``."""
    options: dict[str, dict[str, Any]] = {}
    for text in values:
        target, key, value = parse_option(text)
        options.setdefault(target, {})[key] = value
    return options


def classes_argument(text: str) -> list[str]:
    """``--classes``: ``"a,b,c"``, or ``"@FILE"`` with one class per line (blank lines and ``#``
    comments skipped), checked by ``check_classes``."""
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except OSError as err:
            raise ValueError(f"--classes {text}: cannot read {path} ({err.strerror or err})") from None
        names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    else:
        names = [part.strip() for part in text.split(",") if part.strip()]
    return check_classes(names, f"--classes {text}")


# ------------------------------------------------------------------------- nothing to do?
def nothing_to_do(store: Any, manifest: Manifest, selected_ids: list[str], items: list[EncoderRequest],
                  overwrite: bool, frames_from: str | None = None, decoder: str = "pyav") -> ExtractSummary | None:
    """The summary of a run that would skip every selected clip, or None when that cannot be told
    without building the encoders (see the module docstring). ``store`` is an open store;
    ``frames_from``: the run's ``frames/<size>`` set (video sets must have been made from it, as it
    is now, else the full check decides); ``decoder``: with torchcodec, video sets always go to the
    full check (whether its frames enter the fingerprint depends on the device, resolved there)."""
    if overwrite or any(r.encoder is not None for r in items):
        return None
    if store.classes != list(manifest.classes) and (manifest.classes or not store.classes):
        return None  # the full run adds or refuses the classes
    indexed = set(store.clip_ids)
    if any(c not in indexed for c in manifest.clip_ids):
        return None  # clips to add to the index
    rows = store.rows(selected_ids)
    versions = runtime_info()["versions"]
    summary = ExtractSummary(store.location, NO_DEVICE, clips_selected=len(selected_ids),
                             clips_skipped=len(selected_ids))
    source = _frames_source(store, frames_from)
    for item in items:
        prov = _done_with(store, item, manifest, rows, versions, summary)
        if prov is None or _video(prov) and (prov.get("frames_from") != source or decoder != "pyav"):
            return None
        if is_random_weights(prov):
            summary.random_weights.append(item.name)
    return summary


def _done_with(store: Any, item: EncoderRequest, manifest: Manifest, rows: Any, versions: dict,
               summary: ExtractSummary) -> dict | None:
    """The provenance of ``item``'s set when it is done for ``rows`` with this very request (and
    notes it in the summary), else None."""
    from featurestore.errors import UnknownFeatureError

    if item.name in store.class_feature_sets():
        attrs = store.get_class_features(item.name)[1]
        prov = attrs.get("provenance") or {}
        if not (_same_request(prov, item, versions) and list(attrs.get("classes") or []) == store.classes):
            return None
        summary.class_features[item.name] = "unchanged"
        return prov
    try:
        info = store.feature_info(item.name)
    except UnknownFeatureError:
        return None
    if not (_same_request(info.provenance, item, versions) and _fits(info, manifest)
            and bool(store.done_mask(item.name)[rows].all())):
        return None
    summary.features[item.name] = FeatureSetSummary(item.name, str(info.provenance.get("encoder")),
                                                    skipped=len(rows), random_weights=info.random_weights)
    return info.provenance


def _frames_source(store: Any, frames_from: str | None) -> dict | None:
    """What ``plan.target_provenance`` records as ``frames_from`` for this run (None: decoded video)."""
    from featurestore.errors import UnknownFeatureError

    if frames_from is None:
        return None
    try:
        return {"set": frames_from, "fingerprint": store.feature_info(frames_from).fingerprint}
    except UnknownFeatureError:
        return {"set": frames_from, "fingerprint": None}  # matches nothing: the full run refuses it


def _video(prov: dict) -> bool:
    return ((prov or {}).get("config") or {}).get("modality") == "video"


def _same_request(prov: dict, item: EncoderRequest, versions: dict) -> bool:
    """Asked for the same way (spec as written, options), under the same library versions, and,
    for a checkpoint, a file with the same content."""
    runtime = prov.get("runtime") or {}
    asked = {"spec": str(parse_spec(item.spec)), "options": item.options}
    if canonical_json(runtime.get("request")) != canonical_json(asked) or runtime.get("versions") != versions:
        return False
    weights = prov.get("weights") or {}
    if weights.get("kind") != "file":
        return True
    path = Path(str(parse_spec(item.spec).weights or "")).expanduser()
    return path.is_file() and file_sha256(path) == weights.get("sha256")


def _fits(info: Any, manifest: Manifest) -> bool:
    """The set's segment scheme is the manifest's, and the manifest has the files its encoder reads."""
    config = (info.provenance or {}).get("config") or {}
    modality = config.get("modality")
    if modality == "audio":
        segments = (info.provenance or {}).get("segments") or {}
        return (info.n_segments == manifest.audio_segments
                and float(segments.get("segment_seconds", -1)) == float(manifest.segment_seconds)
                and manifest.has_media("audio"))
    if modality == "video":
        return info.n_segments == manifest.video_frames and manifest.has_media("video")
    return False
