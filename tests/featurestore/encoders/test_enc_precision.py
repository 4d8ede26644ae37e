"""Run options every encoder takes (issue 21 item 3): bf16 autocast and channels-last input.

bf16 features are not float32 features: they must never share a fingerprint (a store would
otherwise mix them silently), and on the CPU they stay within bf16 rounding of the float32 ones.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.encoders import SpecError, create_encoder
from featurestore.provenance import fingerprint
from featurestore.testing import smoke_input

#: bf16 keeps 8 bits of mantissa (relative rounding 2**-8 = 0.4%) and a small network adds a few
#: roundings up: the features stay within 5% of their norm and point the same way (cosine > 0.995).
BF16_RELATIVE_TOLERANCE = 0.05


def test_bf16_autocast_stays_within_bf16_rounding_of_float32_under_another_fingerprint():
    spec = "timm/test_vit@none"
    fp32 = create_encoder(spec)
    bf16 = create_encoder(spec, precision="bfloat16")
    x = fp32.preprocessor()(smoke_input(fp32, n=4))
    a, b = fp32.encode(x).numpy(), bf16.encode(x).numpy()
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # it did run in bf16
    norm = np.linalg.norm(a.reshape(4, -1), axis=1)
    err = np.linalg.norm((a - b).reshape(4, -1), axis=1)
    assert (err <= BF16_RELATIVE_TOLERANCE * norm).all(), err / norm
    cos = (a * b).reshape(4, -1).sum(1) / (norm * np.linalg.norm(b.reshape(4, -1), axis=1))
    assert (cos > 0.995).all(), cos
    assert bf16.provenance()["config"]["run"] == {"precision": "bfloat16"}
    assert "run" not in fp32.provenance()["config"]  # float32 fingerprints are those of before
    assert fingerprint(bf16.provenance()) != fingerprint(fp32.provenance())


def test_channels_last_gives_the_same_features_under_another_fingerprint():
    plain = create_encoder("timm/test_resnet@none")
    last = create_encoder("timm/test_resnet@none", channels_last=True)
    x = plain.preprocessor()(smoke_input(plain, n=1))
    np.testing.assert_allclose(last.encode(x).numpy(), plain.encode(x).numpy(), rtol=1e-4, atol=1e-5)
    assert fingerprint(last.provenance()) != fingerprint(plain.provenance())


def test_a_bad_run_option_is_refused_in_one_line():
    with pytest.raises(SpecError, match=r"precision must be one of float32, bfloat16, got 'fp8'"):
        create_encoder("timm/test_vit@none", precision="fp8")
    assert create_encoder("frames/32").set_run_options().precision == "float32"
    assert torch.float32 == create_encoder("timm/test_vit@none", precision="float32").encode(
        torch.zeros(1, 3, 32, 32)).dtype
