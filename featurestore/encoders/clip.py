"""``clip/<model>`` (image embeddings) and ``cliptext/<model>`` (class-prompt text embeddings), via open_clip.

The paper's CLIP Late Fusion Network sits on frozen image embeddings of RN50x4 (640-d), RN101 (512-d)
and ViT-B/32 (512-d), and its zero-shot models compare them with text embeddings of the class names.

Design decisions:
  * Embeddings are stored RAW (``encode_image(normalize=False)``, what OpenAI's ``encode_image``
    returns and what the paper's network was fed). Zero-shot heads L2-normalise image and text
    embeddings themselves; normalising at extraction would throw away the norm for no gain.
  * Preprocessing is the model's own: image size from the model, mean/std, interpolation and resize
    mode from the pretrained config of the tag (for ``@none`` and checkpoint files: of the model's
    default tag), i.e. for OpenAI weights: shorter side to the input size (bicubic), center crop,
    CLIP mean/std.
  * OpenAI weights were trained with QuickGELU; open_clip's plain configs use GELU and would give
    wrong embeddings with them, so QuickGELU follows the tag (the default tag for ``@none``). A
    checkpoint file does not say which activation it was trained with (an activation has no
    weights), so for ``@file`` it comes from the ``quick_gelu`` option, a ``-quickgelu`` model name,
    an ``open_clip_config.json`` beside the file, or the model's tags when they all agree; when the
    tags disagree (ViT-B-32: ``openai`` QuickGELU, ``laion2b_*`` GELU) the encoder refuses to
    guess. It is recorded in the provenance config.
  * ``@none`` builds the whole CLIP model under the seed, so ``clip/X@none`` and ``cliptext/X@none``
    are the two towers of one (random) model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch

from featurestore.encoders._content_hash import loaded_weights_hash, recording_loaded_files
from featurestore.encoders._encoder import Encoder
from featurestore.encoders._names import EncoderSpec, SpecError
from featurestore.encoders._preprocess import FramePreprocessor, check_normalised_batch
from featurestore.encoders._registry import register_encoder
from featurestore.encoders._weights import (
    Weights,
    announce_random_weights,
    captured_root_log,
    hf_cache_location,
    hub_offline,
    load_into,
    parse_weights,
    pretrained_unavailable,
    read_checkpoint,
    seeded,
)

DEFAULT_TAG = "openai"
PROMPT_TEMPLATE = "a photo of a {}."
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def clip_default_tag(model: str) -> str | None:
    """``openai`` when open_clip has OpenAI weights for ``model``, else its first listed tag."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if DEFAULT_TAG in tags:
        return DEFAULT_TAG
    return tags[0] if tags else None


@dataclass
class OpenClipModel:
    """An open_clip model with the weights, preprocessing and activation it was built with."""

    model: torch.nn.Module
    weights: Weights
    preprocess: dict[str, Any]
    quick_gelu: bool
    embed_dim: int


def build_open_clip(spec: EncoderSpec, strict: bool, image_only_ok: bool,
                    quick_gelu_option: bool | None = None) -> OpenClipModel:
    """Build the open_clip model of ``spec`` with its weights (tag, file or seeded random).

    Args:
        spec: a ``clip/...`` or ``cliptext/...`` spec.
        strict: require every checkpoint key to match.
        image_only_ok: accept a checkpoint of the image tower alone (``visual.*`` keys).
        quick_gelu_option: the user's ``quick_gelu`` option (None: not given); see ``resolve_quick_gelu``.
    """
    import open_clip

    model_name = str(spec.model)
    default = clip_default_tag(model_name)
    weights = parse_weights(spec.weights, default, str(spec))
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if weights.kind == "pretrained" and weights.tag not in tags:
        raise SpecError(f"{spec}: open_clip has no pretrained tag {weights.tag!r} for {model_name}; known tags: "
                        f"{tags or '(none)'}; or use '@none' (random) or '@/path/to/checkpoint.pt'")
    reference_tag = weights.tag if weights.kind == "pretrained" else default
    tag_cfg = open_clip.get_pretrained_cfg(model_name, reference_tag) if reference_tag else {}
    quick_gelu = resolve_quick_gelu(str(spec), model_name, weights, tag_cfg, quick_gelu_option)
    with seeded(weights.seed):
        if weights.kind == "pretrained":
            model, weights = _create_pretrained(spec.with_weights(weights.spec_text), model_name, weights, tag_cfg,
                                                quick_gelu)
        else:
            with _quiet_random_init():  # said once, by us, for '@none'; wrong for '@file' (loaded next)
                model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    if weights.kind == "file":
        _load_checkpoint(model, weights, strict, image_only_ok)
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    if weights.kind != "pretrained":
        preprocess.update({key: tag_cfg[key] for key in _PREPROCESS_KEYS if key in tag_cfg})
    embed_dim = int(open_clip.get_model_config(model_name)["embed_dim"])
    return OpenClipModel(model.eval(), weights, preprocess, quick_gelu, embed_dim)


def _quiet_random_init() -> contextlib.AbstractContextManager:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" log record."""
    return captured_root_log(lambda message: "No pretrained weights loaded" in message)


def resolve_quick_gelu(spec: str, model_name: str, weights: Weights, tag_cfg: dict, option: bool | None) -> bool:
    """Whether the model must run QuickGELU: what its weights were trained with.

    A tag says it (and an option that contradicts it is refused); ``@none`` follows the default
    tag unless the option says otherwise. A checkpoint file cannot say it through its weights, so
    the first of these decides: the option, a ``-quickgelu`` model (its config forces QuickGELU),
    ``open_clip_config.json`` beside the file (what open_clip's hub exports write), the model's
    pretrained tags when they all agree; otherwise the choice is refused rather than guessed.

    Raises:
        SpecError: the option contradicts the tag or a ``-quickgelu`` model, or a file's activation
            cannot be known.
    """
    import open_clip

    forced = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))
    if forced and option is False:
        raise SpecError(f"{spec}: {model_name} is a QuickGELU architecture, so quick_gelu=False cannot apply; "
                        f"use the model without '-quickgelu'")
    if weights.kind == "pretrained":
        trained = bool(tag_cfg.get("quick_gelu", False)) or forced
        if option is not None and option != trained:
            raise SpecError(f"{spec}: weights {weights.tag!r} were trained with {_act(trained)}; "
                            f"quick_gelu={option} would give wrong embeddings (leave the option out)")
        return trained
    if option is not None:
        return option or forced
    if weights.kind == "random" or forced:
        return bool(tag_cfg.get("quick_gelu", False)) or forced
    return _file_quick_gelu(spec, model_name, weights)


def _act(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def _file_quick_gelu(spec: str, model_name: str, weights: Weights) -> bool:
    """A checkpoint's activation from a config beside it, else from the model's tags when they agree."""
    import open_clip

    recorded = _recorded_quick_gelu(Path(str(weights.path)))
    if recorded is not None:
        return recorded
    by_tag = {tag: bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
              for tag in open_clip.list_pretrained_tags_by_model(model_name)}
    if len(set(by_tag.values())) <= 1:
        return next(iter(by_tag.values()), False)
    quick = [tag for tag, value in by_tag.items() if value][:3]
    plain = [tag for tag, value in by_tag.items() if not value][:3]
    raise SpecError(f"{spec}: cannot tell whether checkpoint {weights.path} was trained with QuickGELU "
                    f"(like {model_name}@{'/'.join(quick)}) or GELU (like {model_name}@{'/'.join(plain)}), and "
                    f"the wrong one gives wrong embeddings silently; say which with the option quick_gelu=True "
                    f"or quick_gelu=False (--encoder-option {spec.split('@', 1)[0]}.quick_gelu=...)")


def _recorded_quick_gelu(path: Path) -> bool | None:
    """``model_cfg.quick_gelu`` of an ``open_clip_config.json`` next to the checkpoint, if there is one.

    Raises:
        SpecError: the file is there but is not such a config.
    """
    config = path.parent / "open_clip_config.json"
    if not config.is_file():
        return None
    try:
        model_cfg = json.loads(config.read_text())["model_cfg"]
        return bool(model_cfg.get("quick_gelu", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{config}: not an open_clip config with a 'model_cfg' section "
                        f"({type(exc).__name__}: {exc}); it sits beside checkpoint {path.name} and would say "
                        f"its activation") from None


def _create_pretrained(spec: EncoderSpec, model_name: str, weights: Weights, tag_cfg: dict,
                       quick_gelu: bool) -> tuple[Any, Weights]:
    """The model with the tag's weights, and the weights with the file it read and that file's hash."""
    import open_clip

    tag = str(weights.tag)
    try:
        with hub_offline(), captured_root_log(), recording_loaded_files() as files:
            model = open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=quick_gelu)
    except Exception as exc:
        looked = []
        if tag_cfg.get("hf_hub"):
            repo_id = os.path.split(tag_cfg["hf_hub"])[0]  # 'org/name/' or 'org/name/file.bin'
            looked.append(f"Hugging Face cache {hf_cache_location(repo_id)}")
        if tag_cfg.get("url"):
            looked.append(f"open_clip URL cache ~/.cache/clip/{tag_cfg['url'].rsplit('/', 1)[-1]} (used when "
                          f"huggingface_hub is not installed)")
        raise pretrained_unavailable(str(spec), model_name, tag, looked, exc) from exc
    path, sha256 = loaded_weights_hash(files, model)
    return model, dataclasses.replace(weights, path=Path(path), sha256=sha256)


def _load_checkpoint(model: torch.nn.Module, weights: Weights, strict: bool, image_only_ok: bool) -> None:
    """Load a whole-CLIP state dict or, for image encoders, an image tower's alone (``visual.`` prefix or not)."""
    state = {k: v for k, v in read_checkpoint(weights).items() if k not in _JIT_EXTRA_KEYS}
    if image_only_ok and all(key.startswith("visual.") for key in state):
        state = {k[len("visual."):]: v for k, v in state.items()}
        load_into(model.visual, state, weights.path, strict=strict)
    elif image_only_ok and _fits_better(state, model.visual, model):
        load_into(model.visual, state, weights.path, strict=strict)
    else:  # a whole model: only the tower the encoder runs must come from it (strict=False)
        load_into(model, state, weights.path, strict=strict,
                  used=lambda key: key.startswith("visual.") == image_only_ok)


def _fits_better(state: dict[str, torch.Tensor], tower: torch.nn.Module, model: torch.nn.Module) -> bool:
    """True when more of ``state``'s keys name the tower's parameters than the whole model's."""
    return len(state.keys() & tower.state_dict().keys()) > len(state.keys() & model.state_dict().keys())


def clip_frame_preprocessor(preprocess: dict[str, Any]) -> FramePreprocessor:
    """open_clip's eval transform as a ``FramePreprocessor`` (resize mode ``shortest`` or ``squash``)."""
    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = preprocess.get("resize_mode", "shortest")
    if mode == "squash":
        resize: int | tuple[int, int] = (height, width)
    elif mode == "shortest" and height == width:
        resize = height
    else:
        raise SpecError(f"open_clip preprocessing with resize_mode={mode!r} and size {height}x{width} is not "
                        f"supported (supported: 'shortest' with a square size, 'squash')")
    return FramePreprocessor(crop=(height, width), resize=resize,
                             interpolation=preprocess.get("interpolation", "bicubic"),
                             mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]))


def check_template(template: str) -> str:
    """``template`` when it formats one class name exactly once (``"a photo of a {}."``).

    Checked when the encoder is built, not at the first ``class_prompts``: ``"a {} in {city}"``
    would otherwise fail with a bare ``KeyError`` in the middle of an extraction.
    """
    probe = "\x00class\x00"
    try:
        filled = template.format(probe) if isinstance(template, str) else ""
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as exc:
        raise SpecError(f"cliptext: template {template!r} is not a format string with one '{{}}' for the class "
                        f"name ({type(exc).__name__}: {exc}); write literal braces as '{{{{' and '}}}}'") from None
    if filled.count(probe) != 1:
        raise SpecError(f"cliptext: template must contain exactly one '{{}}' for the class name, got {template!r}")
    return template


class _OpenClipEncoder(Encoder):
    """What the image and text encoders share: spec checks, weights, provenance."""

    @classmethod
    def known_models(cls) -> list[str]:
        import open_clip

        return open_clip.list_models()

    def _setup(self, strict: bool, image_only_ok: bool, quick_gelu: bool | None) -> OpenClipModel:
        if quick_gelu is not None and not isinstance(quick_gelu, bool):
            raise SpecError(f"{self._spec}: quick_gelu must be true or false, got {quick_gelu!r}")
        built = build_open_clip(self._spec, strict, image_only_ok, quick_gelu)
        self.weights = built.weights
        self._spec = self._spec.with_weights(built.weights.spec_text)
        self.quick_gelu = built.quick_gelu
        self.embed_dim = built.embed_dim
        if self.weights.kind == "random":
            announce_random_weights(self.spec)
        return built

    def weights_provenance(self) -> dict[str, Any]:
        return self.weights.provenance()

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.embed_dim,)


@register_encoder("clip")
class ClipImageEncoder(_OpenClipEncoder):
    """Raw (not L2-normalised) CLIP image embeddings of video frames, ``[B, embed_dim]``."""

    modality = "video"
    smoke_spec = "clip/ViT-B-32@none"

    def __init__(self, spec: str | EncoderSpec, strict: bool = True, quick_gelu: bool | None = None) -> None:
        super().__init__(spec)
        built = self._setup(strict, image_only_ok=True, quick_gelu=quick_gelu)
        self.module = built.model.visual
        self._preprocessor = clip_frame_preprocessor(built.preprocess)

    def config(self) -> dict[str, Any]:
        return {"library": "open_clip", "model": self._spec.model, "tower": "image", "quick_gelu": self.quick_gelu,
                "normalized": False, "preprocess": self._preprocessor.config()}

    def preprocessor(self) -> FramePreprocessor:
        return self._preprocessor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        check_normalised_batch(batch, self.spec)
        return self.module(batch.float()).float()


@dataclass
class ClipTokenizer:
    """Picklable text preprocessor: ``list[str]`` -> token ids ``[n, context_length]``.

    Holds only the model name; open_clip's tokenizer is built on first use in each process.
    """

    model: str
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"expected a list of strings, got {type(texts).__name__}")
        return self._get()(list(texts))

    def _get(self) -> Any:
        """open_clip's tokenizer of the model, built on first use in this process."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model)
        return self._tokenizer

    def overlong(self, texts: list[str]) -> list[tuple[str, int, int]]:
        """``(text, tokens, context)`` for each text longer than the context, which the tokenizer
        would cut silently (only for tokenizers that can count: open_clip's own BPE one)."""
        tokenizer = self._get()
        encode, context = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
        if not callable(encode) or not isinstance(context, int):
            return []
        counts = [(text, len(encode(text)) + 2) for text in texts]  # + start and end of text
        return [(text, n, context) for text, n in counts if n > context]

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "_tokenizer": None}


@register_encoder("cliptext")
class ClipTextEncoder(_OpenClipEncoder):
    """Raw CLIP text embeddings of class prompts, for zero-shot heads (``class_features`` in the store).

    ``class_prompts(classes)`` turns class names into sentences with ``template`` (default
    ``"a photo of a {}."``, underscores become spaces: ``street_traffic`` -> ``"a photo of a street
    traffic."``); ``encode_text(prompts)`` embeds them.
    """

    modality = "text"
    smoke_spec = "cliptext/ViT-S-32-alt@none"  # the smallest built-in CLIP config

    def __init__(self, spec: str | EncoderSpec, strict: bool = True, template: str = PROMPT_TEMPLATE,
                 quick_gelu: bool | None = None) -> None:
        super().__init__(spec)
        self.template = check_template(template)
        built = self._setup(strict, image_only_ok=False, quick_gelu=quick_gelu)
        built.model.visual = None  # the text tower is all this encoder runs
        self.module = built.model
        self._tokenizer = ClipTokenizer(str(self._spec.model))

    def config(self) -> dict[str, Any]:
        return {"library": "open_clip", "model": self._spec.model, "tower": "text", "quick_gelu": self.quick_gelu,
                "normalized": False, "template": self.template}

    def class_prompts(self, classes: list[str]) -> list[str]:
        """One prompt per class name: the template with ``_`` in the name turned into spaces.

        Refuses what would give a zero-shot head wrong class embeddings without a word: an empty
        name, a prompt longer than the text tower's context (the tokenizer cuts it), and two classes
        whose prompts tokenize alike (``street_traffic`` and ``Street traffic``, or names that differ
        only past the cut), which would share one embedding.

        Raises:
            ValueError: naming the class(es) and what is wrong.
        """
        names = [str(name) for name in classes]
        empty = [name for name in names if not name.replace("_", " ").strip()]
        if empty:
            raise ValueError(f"{self.spec}: class name {empty[0]!r} is empty; a prompt needs a name")
        prompts = [self.template.format(name.replace("_", " ")) for name in names]
        overlong = self._tokenizer.overlong(prompts)
        if overlong:
            prompt, tokens, context = overlong[0]
            name = names[prompts.index(prompt)]
            raise ValueError(f"{self.spec}: the prompt of class {name!r} is {tokens} tokens, more than the text "
                             f"tower's context of {context}, and would be cut: {prompt[:80]!r}...; shorten the "
                             f"class name or the template")
        self._check_distinct(names, prompts)
        return prompts

    def _check_distinct(self, names: list[str], prompts: list[str]) -> None:
        """Refuse two classes whose prompts become the same tokens (one embedding for two classes)."""
        if len(prompts) < 2:
            return
        seen: dict[bytes, str] = {}
        for name, row in zip(names, self._tokenizer(prompts)):
            other = seen.setdefault(row.numpy().tobytes(), name)
            if other != name:
                raise ValueError(f"{self.spec}: classes {other!r} and {name!r} give the same prompt tokens "
                                 f"({self.template.format(name.replace('_', ' '))!r}), so they would share "
                                 f"one text embedding")

    def preprocessor(self) -> ClipTokenizer:
        return self._tokenizer

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module.encode_text(batch.long()).float()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embed sentences: ``list[str]`` -> ``[n, embed_dim]`` float32 on ``self.device``."""
        return self.encode(self._tokenizer(texts))
