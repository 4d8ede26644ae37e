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
    wrong embeddings with them, so QuickGELU follows the tag (or the default tag for ``@none`` and
    files) and is recorded in the provenance config.
  * ``@none`` builds the whole CLIP model under the seed, so ``clip/X@none`` and ``cliptext/X@none``
    are the two towers of one (random) model.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

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
    read_state_dict,
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


def build_open_clip(spec: EncoderSpec, strict: bool, image_only_ok: bool) -> OpenClipModel:
    """Build the open_clip model of ``spec`` with its weights (tag, file or seeded random).

    Args:
        spec: a ``clip/...`` or ``cliptext/...`` spec.
        strict: require every checkpoint key to match.
        image_only_ok: accept a checkpoint of the image tower alone (``visual.*`` keys).
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
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or "quickgelu" in model_name.lower()
    with seeded(weights.seed):
        if weights.kind == "pretrained":
            model = _create_pretrained(spec.with_weights(weights.spec_text), model_name, str(weights.tag), tag_cfg, quick_gelu)
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


def _create_pretrained(spec: EncoderSpec, model_name: str, tag: str, tag_cfg: dict, quick_gelu: bool) -> Any:
    import open_clip

    try:
        with hub_offline(), captured_root_log():  # its "Failed to download" line repeats what we raise
            return open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=quick_gelu)
    except Exception as exc:
        looked = []
        if tag_cfg.get("hf_hub"):
            repo_id = os.path.split(tag_cfg["hf_hub"])[0]  # 'org/name/' or 'org/name/file.bin'
            looked.append(f"Hugging Face cache {hf_cache_location(repo_id)}")
        if tag_cfg.get("url"):
            looked.append(f"open_clip URL cache ~/.cache/clip/{tag_cfg['url'].rsplit('/', 1)[-1]} (used when "
                          f"huggingface_hub is not installed)")
        raise pretrained_unavailable(str(spec), model_name, tag, looked, exc) from exc


def _load_checkpoint(model: torch.nn.Module, weights: Weights, strict: bool, image_only_ok: bool) -> None:
    """Load a whole-CLIP state dict or, for image encoders, an image tower's alone (``visual.`` prefix or not)."""
    state = {k: v for k, v in read_state_dict(weights.path).items() if k not in _JIT_EXTRA_KEYS}
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

    def _setup(self, strict: bool, image_only_ok: bool) -> OpenClipModel:
        built = build_open_clip(self._spec, strict, image_only_ok)
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

    def __init__(self, spec: str | EncoderSpec, strict: bool = True) -> None:
        super().__init__(spec)
        built = self._setup(strict, image_only_ok=True)
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

    def __init__(self, spec: str | EncoderSpec, strict: bool = True, template: str = PROMPT_TEMPLATE) -> None:
        super().__init__(spec)
        self.template = check_template(template)
        built = self._setup(strict, image_only_ok=False)
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
