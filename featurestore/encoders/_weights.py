"""Where an encoder's weights come from: a pretrained tag, a local checkpoint, or a seeded random init.

The ``@weights`` part of a spec is one of
  * a pretrained tag (``openai``, ``ra3_in1k``, ``pretrained`` = the model's default tag), loaded
    through the library's own pretrained path, which reads the Hugging Face / torch hub caches;
  * a checkpoint path (``@/ckpt/model.safetensors``), loaded strictly, identified by its SHA-256;
  * ``none`` (or ``none:<seed>``): random init under a fixed seed, announced loudly, because features
    from random weights look like features and carry no pretrained knowledge.

Downloads are off by default: a pretrained attempt runs with ``HF_HUB_OFFLINE=1`` so that a machine
without network fails at once with a message saying what was wanted, where it looked and what the
alternatives are, instead of hanging. Set ``FEATURESTORE_ALLOW_DOWNLOAD=1`` to let the libraries
download.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featurestore.encoders._base import SpecError
from featurestore.errors import FeatureStoreError

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
        path: the absolute checkpoint path (kind ``file``).
        seed: the init seed (kind ``random``; also used around construction for the other kinds).
        sha256: hex SHA-256 of the checkpoint file (kind ``file``).
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
            raise WeightsNotFoundError(f"{spec}: checkpoint file {path} does not exist")
        return Weights(kind="file", path=path, sha256=file_sha256(path))
    return Weights(kind="pretrained", tag=text)


def _parse_seed(text: str, spec: str) -> int:
    if text == "none":
        return DEFAULT_SEED
    try:
        return int(text.split(":", 1)[1])
    except ValueError:
        raise SpecError(f"{spec}: random weights take an integer seed, 'none' or 'none:<seed>', got {text!r}") from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks so multi-GB checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ===================================================================== checkpoints
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (pickle or TorchScript archive).

    Unwraps one level of nesting under ``state_dict`` / ``model_state_dict`` / ``model`` /
    ``module`` (training checkpoints) and a ``module.`` key prefix (DataParallel), because those are how checkpoints
    are commonly saved and carry the same weights.

    Raises:
        WeightsMismatchError: the file holds something that is not a tensor dict.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        obj = _torch_load(path)
    obj = _unnest(obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"dict with keys {list(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise WeightsMismatchError(f"checkpoint {path} does not hold a state dict of tensors (found {found})")
    if all(key.startswith("module.") for key in obj):
        obj = {key[len("module."):]: value for key, value in obj.items()}
    return obj


def _torch_load(path: Path) -> Any:
    if _is_torchscript_archive(path):  # OpenAI's CLIP .pt files: read the archive's tensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated; old archives still exist
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatchError(f"checkpoint {path} could not be read as a torch file: {exc}") from exc


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold ``<name>/constants.pkl``; plain ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _unnest(obj: Any) -> Any:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTING_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path,
              strict: bool = True) -> None:
    """Load ``state_dict`` into ``module``; with ``strict`` every key must match both ways.

    Raises:
        WeightsMismatchError: naming the checkpoint and the missing / unexpected / misshapen keys.
    """
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise WeightsMismatchError(f"checkpoint {source} does not fit {type(module).__name__}: {exc}") from exc
    if strict and (result.missing_keys or result.unexpected_keys):
        raise WeightsMismatchError(
            f"checkpoint {source} does not fit {type(module).__name__} (strict load): "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}")


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


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Run the block with the Hugging Face hub offline (cache only), unless downloads are allowed.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once at import, so the module constant is switched
    as well as the environment variable; both are restored afterwards.
    """
    if downloads_allowed():
        yield
        return
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
        f"(a local state dict). Cause: {type(cause).__name__}: {str(cause)[:300]}")
