"""Where an encoder's weights come from: a pretrained tag, a local checkpoint, or a seeded random init.

The ``@weights`` part of a spec is one of
  * a pretrained tag (``openai``, ``ra3_in1k``, ``pretrained`` = the model's default tag), loaded
    through the library's own pretrained path, which reads the Hugging Face / torch hub caches; the
    file it read is identified by its SHA-256 too (a replaced cache must not pass for the same tag);
  * a checkpoint path (``@/ckpt/model.safetensors``), loaded strictly, identified by its SHA-256;
  * ``none`` (or ``none:<seed>``): random init under a fixed seed, announced loudly, because features
    from random weights look like features and carry no pretrained knowledge.

Downloads are off by default: a pretrained attempt runs with ``HF_HUB_OFFLINE=1`` and with torch
hub's and open_clip's URL downloads refused, so that a machine without network fails at once (and one
with network does not download behind an offline request) with a message saying what was wanted,
where it looked and what the alternatives are, instead of hanging. Set
``FEATURESTORE_ALLOW_DOWNLOAD=1`` to let the libraries download.
"""
from __future__ import annotations

import contextlib
import logging
import types
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featurestore.encoders._content_hash import cached_sha256
from featurestore.encoders._patching import SharedPatch
from featurestore.encoders._names import SpecError
from featurestore.errors import FeatureStoreError
from featurestore.provenance import file_sha256  # noqa: F401 - re-exported (torch-free, used by the planner)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
DEFAULT_SEED = 0
ALLOW_DOWNLOAD_ENV = "FEATURESTORE_ALLOW_DOWNLOAD"
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module")
_ANNOUNCED: set[str] = set()


class WeightsNotFoundError(FeatureStoreError, FileNotFoundError):
    """Pretrained weights are not available locally, or a checkpoint path does not exist."""


class WeightsMismatchError(FeatureStoreError, ValueError):
    """A checkpoint does not fit the model (missing/unexpected keys, wrong shapes, not a state dict)."""


@dataclass(frozen=True)
class Weights:
    """The resolved ``@weights`` choice of a spec.

    Attributes:
        kind: ``pretrained``, ``file`` or ``random``.
        tag: the pretrained tag (kind ``pretrained``).
        path: the absolute checkpoint path (kind ``file``), or the file the library read for a
            tag (kind ``pretrained``, once loaded).
        seed: the init seed (kind ``random``; also used around construction for the other kinds).
        sha256: hex SHA-256 of the checkpoint file (kind ``file``) or of the file loaded for a tag
            (kind ``pretrained``, once loaded; see ``_content_hash.loaded_weights_hash``).
    """

    kind: str
    tag: str | None = None
    path: Path | None = None
    seed: int = DEFAULT_SEED
    sha256: str | None = None

    @property
    def spec_text(self) -> str:
        """What goes after ``@`` in the canonical spec."""
        if self.kind == "random":
            return "none" if self.seed == DEFAULT_SEED else f"none:{self.seed}"
        if self.kind == "file":
            return str(self.path)
        return str(self.tag)

    def provenance(self) -> dict[str, Any]:
        """The ``weights`` section of a feature set's provenance."""
        if self.kind == "random":
            return {"kind": "random", "seed": self.seed}
        if self.kind == "file":
            return {"kind": "file", "path": str(self.path), "sha256": self.sha256}
        if self.sha256:
            return {"kind": "pretrained", "tag": self.tag, "path": str(self.path), "sha256": self.sha256}
        return {"kind": "pretrained", "tag": self.tag}


def looks_like_path(text: str) -> bool:
    """True for ``/abs``, ``./rel``, ``../rel``, ``~/x`` or a name ending in a checkpoint suffix."""
    return text.startswith(("/", "./", "../", "~")) or text.lower().endswith(CHECKPOINT_SUFFIXES)


def parse_weights(text: str | None, default_tag: str | None, spec: str) -> Weights:
    """Resolve the ``@weights`` text of ``spec``; None means the family's default tag.

    Raises:
        SpecError: no weights given and the model has no default tag, or a malformed ``none:<seed>``.
        WeightsNotFoundError: a checkpoint path that does not exist.
    """
    if text is None:
        if default_tag is None:
            raise SpecError(f"{spec}: this model has no default pretrained weights; add '@<tag>', "
                            f"'@none' (random) or '@/path/to/checkpoint.pt'")
        return Weights(kind="pretrained", tag=default_tag)
    if text == "none" or text.startswith("none:"):
        return Weights(kind="random", seed=_parse_seed(text, spec))
    if looks_like_path(text):
        path = Path(text).expanduser().resolve()
        if not path.is_file():
            what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
            raise WeightsNotFoundError(f"{spec}: checkpoint file {path} {what}")
        return Weights(kind="file", path=path, sha256=cached_sha256(path))
    return Weights(kind="pretrained", tag=text)


def _parse_seed(text: str, spec: str) -> int:
    if text == "none":
        return DEFAULT_SEED
    try:
        return int(text.split(":", 1)[1])
    except ValueError:
        raise SpecError(f"{spec}: random weights take an integer seed, 'none' or 'none:<seed>', got {text!r}") from None


# ===================================================================== checkpoints
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a plain ``torch.save`` file, never running code.

    A checkpoint is data: safetensors is read as such, a torch file only with
    ``torch.load(weights_only=True)`` (tensors and plain containers; a pickle that names any other
    callable is refused), and a TorchScript archive (which holds code that runs while it loads) is
    refused. Unwraps one level of nesting under ``state_dict`` / ``model_state_dict`` / ``model`` /
    ``module`` (training checkpoints) and a ``module.`` key prefix (DataParallel), because those are
    how checkpoints are commonly saved and carry the same weights.

    Raises:
        WeightsMismatchError: the file is a TorchScript archive, holds pickled objects other than
            tensors, cannot be read, or holds something that is not a tensor dict.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        obj: Any = _safetensors_load(path)
    else:
        obj = _torch_load(path)
    obj = _unnest(obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"dict with keys {list(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise WeightsMismatchError(f"checkpoint {path} does not hold a state dict of tensors (found {found})")
    if all(key.startswith("module.") for key in obj):
        obj = {key[len("module."):]: value for key, value in obj.items()}
    return obj


def read_checkpoint(weights: Weights) -> dict[str, torch.Tensor]:
    """``read_state_dict`` of a ``file`` choice, refusing a file that changed since it was hashed.

    The hash is taken when the spec is resolved and recorded as the weights' identity; a checkpoint
    rewritten in between (a training job still saving ``last.pt``) would otherwise be loaded under
    the old file's hash. The second look is cheap: the hash cache answers unless the file changed.

    Raises:
        WeightsMismatchError: the file's content is no longer the hashed one, or as ``read_state_dict``.
    """
    state = read_state_dict(str(weights.path))
    now = cached_sha256(str(weights.path))
    if now != weights.sha256:
        raise WeightsMismatchError(f"checkpoint {weights.path} changed after it was identified (sha256 "
                                   f"{str(weights.sha256)[:12]}... then, {now[:12]}... now); refusing to load "
                                   f"weights other than the recorded ones; run again once the file is final")
    return state


_SAVE_HINT = ("save the weights alone instead: safetensors.torch.save_file(model.state_dict(), 'x.safetensors') "
              "or torch.save(model.state_dict(), 'x.pt')")


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsMismatchError(f"checkpoint {path} could not be read as a safetensors file: "
                                   f"{one_line(exc)}") from None


def _torch_load(path: Path) -> Any:
    if _is_torchscript_archive(path):
        raise WeightsMismatchError(f"checkpoint {path} is a TorchScript archive, which holds code that runs when it "
                                   f"is loaded, so it is not loaded; {_SAVE_HINT}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = _refused_global(exc)
        if refused:
            raise WeightsMismatchError(
                f"checkpoint {path} holds pickled objects other than tensors and plain containers ({refused}), "
                f"which are refused because unpickling them can run code; {_SAVE_HINT}") from None
        raise WeightsMismatchError(f"checkpoint {path} could not be read as a torch file: {one_line(exc)}") from None


def _refused_global(exc: BaseException) -> str:
    """The 'Unsupported global: GLOBAL x.y ...' line of torch's weights-only refusal, or ''."""
    if not isinstance(exc, pickle.UnpicklingError):
        return ""
    for line in str(exc).splitlines():
        if "Unsupported global" in line:
            return line.strip().rstrip(".")[:200]
    return ""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line (or its type), cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold ``<name>/constants.pkl`` or ``<name>/code/``; plain ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _unnest(obj: Any) -> Any:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTING_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path,
              strict: bool = True, used: Callable[[str], bool] | None = None) -> None:
    """Load ``state_dict`` into ``module``; with ``strict`` every key must match both ways.

    Without ``strict`` keys may be missing, and those weights keep their (seeded) initial values;
    that is said on stderr, with how many. A checkpoint that leaves *every* weight the encoder
    runs at its initial value is still refused: its features would be those of ``@none`` under a
    ``file`` provenance (a checkpoint whose keys all carry a prefix the model lacks does that).

    Args:
        used: which of ``module``'s keys the encoder runs (default: all), e.g. only the image
            tower's of a whole CLIP model loaded for image embeddings.

    Raises:
        WeightsMismatchError: one line naming the checkpoint, how many keys are missing / unexpected
            / misshapen, and what the keys look like on both sides (a wrong key prefix shows at once).
    """
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError:  # shape mismatches raise even when strict=False; torch lists every one
        raise WeightsMismatchError(_mismatch_message(module, state_dict, source)) from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise WeightsMismatchError(_mismatch_message(module, state_dict, source, result.missing_keys))
    if not strict:
        _check_partial_load(module, state_dict, source, result.missing_keys, used)


def _check_partial_load(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path,
                        missing: list[str], used: Callable[[str], bool] | None) -> None:
    """Refuse a non-strict load that loaded none of the used weights; say how many stayed initial.

    Batch-norm step counters (``num_batches_tracked``) are not weights: torch fills them in
    without calling them missing, and they change no output.
    """
    wanted = [key for key in module.state_dict() if (used is None or used(key))
              and not key.endswith("num_batches_tracked")]
    absent = set(missing)
    left = [key for key in wanted if key in absent or key not in state_dict]
    if wanted and len(left) == len(wanted):
        raise WeightsMismatchError(
            f"{_mismatch_message(module, state_dict, source, missing)}; none of the {len(wanted)} weights the "
            f"encoder runs is in the checkpoint, so even with strict=False its features would be those of "
            f"random weights")
    if left:
        print(f"WARNING: checkpoint {source} (strict=False) lacks {len(left)} of the {len(wanted)} weights the "
              f"encoder runs, e.g. {left[:3]}; they keep their random initial values", file=sys.stderr)


def _mismatch_message(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path,
                      missing: list[str] | None = None) -> str:
    own = module.state_dict()
    if missing is None:
        missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    misshapen = [key for key in state_dict if key in own and tuple(state_dict[key].shape) != tuple(own[key].shape)]
    parts = [f"checkpoint {source} does not fit {type(module).__name__}: {len(missing)} missing keys, "
             f"{len(unexpected)} unexpected keys, {len(misshapen)} keys with another shape "
             f"({len(state_dict)} keys in the checkpoint, {len(own)} in the model)"]
    if misshapen:
        key = misshapen[0]
        parts.append(f"e.g. {key!r} is {list(state_dict[key].shape)} in the checkpoint, "
                     f"{list(own[key].shape)} in the model")
    if missing or unexpected:
        parts.append(f"expected keys like {missing[:2] or list(own)[:2]}, found {unexpected[:2] or list(state_dict)[:2]}")
        hint = _prefix_hint(missing, unexpected)
        if hint:
            parts.append(hint)
    return "; ".join(parts)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Name a key prefix that the checkpoint has and the model lacks (or the other way round)."""
    for found in unexpected[:50]:
        for wanted in missing:
            if found.endswith("." + wanted):
                return f"the checkpoint's keys carry an extra prefix {found[:-len(wanted)]!r}"
            if wanted.endswith("." + found):
                return f"the checkpoint's keys lack the prefix {wanted[:-len(found)]!r}"
    return ""


# ===================================================================== random init
@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for model construction, restoring the caller's RNG state after.

    Models are built on the CPU, so the same seed gives bit-identical random weights on every run
    and every machine; the caller's own random stream is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def announce_random_weights(spec: str) -> None:
    """Print the random-weights warning once per spec per process (stderr)."""
    if spec in _ANNOUNCED:
        return
    _ANNOUNCED.add(spec)
    print(f"WARNING: {spec} uses RANDOM weights: its features carry no pretrained knowledge", file=sys.stderr)


# ===================================================================== pretrained via the hub caches
def downloads_allowed() -> bool:
    """True when ``FEATURESTORE_ALLOW_DOWNLOAD`` is set to 1/true/yes."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


class DownloadRefusedError(FeatureStoreError, ConnectionRefusedError):
    """A library tried to download weights inside ``hub_offline()`` while downloads are off."""


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Run the block with weight downloads off (cache only), unless downloads are allowed.

    The Hugging Face hub is switched offline: ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once at
    import, so the module constant is switched as well as the environment variable. URL downloads
    do not ask the hub, so they are refused where they happen: ``torch.hub.download_url_to_file``
    (behind ``torch.hub.load_state_dict_from_url``, which timm uses for URL weights), timm's own
    import of it, and open_clip's ``urllib`` download of URL weights; each raises
    ``DownloadRefusedError`` naming the URL before any connection. Cached files are still read.
    Everything is restored afterwards.
    """
    if downloads_allowed():
        yield
        return
    with _hf_offline(), _urls_refused():
        yield


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = _hf_constants()
    old_const = getattr(constants, "HF_HUB_OFFLINE", None) if constants else None
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const


def _refuse_download(url: Any, *args: Any, **kwargs: Any) -> Any:
    raise DownloadRefusedError(f"download of {getattr(url, 'full_url', url)} refused: downloads are off "
                               f"(set {ALLOW_DOWNLOAD_ENV}=1 on a machine with network to allow them)")


#: ``(module, attribute)`` pairs replaced by a refusal inside ``hub_offline`` (modules not imported
#: yet are skipped: timm and open_clip are imported before the pretrained attempt that matters).
_URL_DOWNLOADERS = (("torch.hub", "download_url_to_file"), ("timm.models._hub", "download_url_to_file"))


def _url_refusals() -> list[tuple[Any, str, Any]]:
    """The URL download functions, each replaced by ``_refuse_download``; open_clip's ``urllib``
    (its only use there: ``urllib.request.urlopen``) by one whose ``urlopen`` refuses."""
    found = [(module, attr, _refuse_download) for module_name, attr in _URL_DOWNLOADERS
             if (module := sys.modules.get(module_name)) is not None and hasattr(module, attr)]
    pretrained = sys.modules.get("open_clip.pretrained")
    if pretrained is not None and hasattr(pretrained, "urllib"):
        refusing = types.SimpleNamespace(request=types.SimpleNamespace(urlopen=_refuse_download))
        found.append((pretrained, "urllib", refusing))
    return found


#: ``with _urls_refused():`` the URL download functions refuse (nested and threaded use counted).
_urls_refused = SharedPatch(_url_refusals)


@contextlib.contextmanager
def captured_root_log(drop: Any = None) -> Iterator[list[str]]:
    """Keep records logged on the root logger (``logging.error(...)``) off the user's terminal.

    open_clip reports a failed pretrained attempt with ``logging.error("Failed to download ...")``
    and then raises; the raised error becomes our one-line message, so its log line would only be a
    second, contradicting copy. Records for which ``drop(message)`` is true (all when ``drop`` is
    None) are collected into the yielded list instead of printed. A ``NullHandler`` sits on the
    root logger meanwhile so that ``logging.error`` does not call ``basicConfig`` as a side effect.
    """
    kept: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if drop is None or drop(message):
            kept.append(message)
            return False
        return True

    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    root.addFilter(keep)
    try:
        yield kept
    finally:
        root.removeFilter(keep)
        root.removeHandler(guard)


def _hf_constants() -> Any:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return constants


def hf_cache_location(repo_id: str) -> str:
    """Where ``huggingface_hub`` keeps files of ``repo_id`` (``<HF_HUB_CACHE>/models--org--name``)."""
    constants = _hf_constants()
    root = constants.HF_HUB_CACHE if constants is not None else "~/.cache/huggingface/hub"
    return str(Path(root) / ("models--" + repo_id.strip("/").replace("/", "--")))


def torch_hub_location(url: str) -> str:
    """Where ``torch.hub`` keeps a checkpoint downloaded from ``url``."""
    return str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url))


def pretrained_unavailable(spec: str, model: str, tag: str, looked_in: list[str],
                           cause: BaseException) -> WeightsNotFoundError:
    """The error for pretrained weights that could not be loaded; names what, where and what else."""
    base = spec.split("@", 1)[0]
    where = "; ".join(looked_in) if looked_in else "the library's default caches"
    how = "downloads are allowed" if downloads_allowed() else \
        f"downloads are off (set {ALLOW_DOWNLOAD_ENV}=1 on a machine with network to fetch them)"
    return WeightsNotFoundError(
        f"{spec}: pretrained weights {tag!r} for {model} are not available locally. Looked in: {where}; "
        f"{how}. Alternatives: '{base}@none' (random weights, seeded) or '{base}@/path/to/checkpoint.pt' "
        f"(a local state dict). Cause: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}")
