"""Errors the heads package raises on purpose."""
from __future__ import annotations

from featurestore.errors import FeatureStoreError, pickled_by_state


class FeatureFingerprintError(FeatureStoreError):
    """A trained head was asked to predict on a feature set computed differently from its training data."""

    def __init__(self, run_dir: str, feature: str, trained: str, found: str):
        self.feature, self.trained, self.found = feature, trained, found
        super().__init__(
            f"head in {run_dir!r} was trained on feature set {feature!r} with fingerprint {trained}, but the "
            f"store's {feature!r} has fingerprint {found}: the features were computed with another encoder "
            f"configuration or weights. Re-extract them as in training, or train a new head on these features."
        )


class UnknownHeadError(KeyError):
    """No head is registered under the requested name; the message lists the registered ones."""

    __reduce__ = pickled_by_state  # its __init__ takes other arguments than its message

    def __init__(self, name: str, known: list[str]):
        self.name = name
        super().__init__(f"no head named {name!r}; registered heads: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class HeadConfigError(TypeError):
    """A head config names fields the head's config dataclass does not have (a TypeError, as a wrong
    keyword argument would be)."""
