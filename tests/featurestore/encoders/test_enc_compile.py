"""cudnn.benchmark and torch.compile as run options (issue 21 item 3).

A compiled graph is specialised to its input shape; extraction's last batch is smaller than the
others, so ``encode`` pads it to one static batch size and cuts the output back. These tests use
the ``eager`` torch.compile backend (dynamo traces and guards as with inductor, without minutes of
kernel compilation on 2 cores); the option's own default backend stays ``inductor``.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from featurestore.encoders import SpecError, create_encoder
from featurestore.encoders._encoder import pad_batch
from featurestore.extract import encoder_options_argument
from featurestore.provenance import fingerprint
from featurestore.testing import smoke_input

SPEC = "timm/test_resnet@none"


def _frames(encoder, n: int) -> torch.Tensor:
    """``n`` distinct preprocessed frames (so a wrong row order or a padded row would show)."""
    return encoder.preprocessor()(smoke_input(encoder, n=n))


def test_a_padded_batch_gives_exactly_the_unpadded_outputs_for_the_real_rows():
    encoder = create_encoder(SPEC)
    x = _frames(encoder, 3)
    padded = pad_batch(x, 8)
    assert padded.shape[0] == 8 and torch.equal(padded[3:], x[-1:].expand(5, *x.shape[1:]))
    assert pad_batch(x, 3) is x  # a full batch is not copied
    assert torch.equal(encoder.encode(padded)[:3], encoder.encode(x))


def test_a_compiled_encoder_compiles_once_across_a_run_with_a_ragged_last_batch():
    plain = create_encoder(SPEC)
    compiled = create_encoder(SPEC, compile="eager")
    x = _frames(plain, 7)
    batches = [x[0:3], x[3:6], x[6:7]]  # batch size 3, the last batch holds 1 row
    graphs = counters["stats"]["unique_graphs"]
    outs = [compiled.encode(batches[0])]
    assert counters["stats"]["unique_graphs"] > graphs  # the first batch compiled the model
    # Then nothing more: no recompile for the second batch nor the padded 1-row one. (Counted from the
    # first call on: how many frames that call compiles depends on what earlier tests of the same
    # process left in dynamo's state, 1 alone and 5 after others in one CI run.)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    outs += [compiled.encode(b) for b in batches[1:]]
    assert counters["frames"]["total"] == frames and counters["stats"]["unique_graphs"] == graphs
    assert compiled.static_batch == 3
    assert [tuple(o.shape) for o in outs] == [(3, *plain.output_shape)] * 2 + [(1, *plain.output_shape)]
    for batch, out in zip(batches, outs):  # same kernels as eager: the real rows' outputs are exact
        assert torch.equal(out, plain.encode(batch))


def test_cudnn_benchmark_and_compile_land_in_the_fingerprint():
    plain = create_encoder(SPEC)
    tuned = create_encoder(SPEC, cudnn_benchmark=True, compile=True)
    assert tuned.provenance()["config"]["run"] == {"cudnn_benchmark": True, "compile": "inductor"}
    eager = create_encoder(SPEC, compile="eager")
    prints = {fingerprint(e.provenance()) for e in (plain, tuned, eager)}
    assert len(prints) == 3
    assert "run" not in create_encoder(SPEC, cudnn_benchmark=False, compile=False).provenance()["config"]
    x = _frames(plain, 2)  # on the CPU cuDNN is not used: same values, and the global flag is restored
    before = torch.backends.cudnn.benchmark
    assert torch.equal(create_encoder(SPEC, cudnn_benchmark=True).encode(x), plain.encode(x))
    assert torch.backends.cudnn.benchmark == before


def test_the_options_come_from_the_command_line_text_as_the_other_run_options():
    options = encoder_options_argument(["timm/test_resnet.compile=true", "timm/test_resnet.cudnn_benchmark=true"])
    encoder = create_encoder(SPEC, **options["timm/test_resnet"])  # as extraction builds it
    assert encoder.run_options() == {"cudnn_benchmark": True, "compile": "inductor"}
    assert encoder.request["options"] == {"compile": True, "cudnn_benchmark": True}


@pytest.mark.parametrize(("option", "value", "message"), [
    ("compile", "yes", r"compile must be true, false or a torch\.compile backend \(.*inductor.*\), got 'yes'"),
    ("compile", 1, r"compile must be true, false or a torch\.compile backend .*got 1"),
    ("cudnn_benchmark", "true", r"cudnn_benchmark must be true or false, got 'true'"),
])
def test_a_bad_value_is_a_one_line_error(option, value, message):
    with pytest.raises(SpecError, match=message) as err:
        create_encoder(SPEC, **{option: value})
    assert "\n" not in str(err.value) and SPEC.partition("@")[0] in str(err.value)


def test_extraction_takes_compile_from_the_command_line_and_compiles_once(tmp_path, capsys):
    from tests.featurestore.test_extract_support import make_dataset

    from featurestore.cli import main
    from featurestore.store import open_store

    dataset = make_dataset(tmp_path / "data", 3, seconds=1.0, frames=2)
    # 3 clips x 2 frames in batches of 2 clips: encoder calls of 4 frames, then 2 (ragged). frames/32
    # (a real, parameter-free encoder) traces in a blink; the model case is the test above.
    options = ["--encoders", "frames/32", "--device", "cpu", "--num-workers", "0", "--batch-size", "2",
               "--segments", "1", "--frames", "2", "-q"]
    assert main(["extract", str(dataset.root), str(tmp_path / "plain.zarr"), *options]) == 0
    frames = counters["frames"]["total"]
    assert main(["extract", str(dataset.root), str(tmp_path / "compiled.zarr"), *options,
                 "--encoder-option", "frames/32.compile=eager"]) == 0
    assert counters["frames"]["total"] - frames == 1, capsys.readouterr().err
    with open_store(tmp_path / "plain.zarr") as plain, open_store(tmp_path / "compiled.zarr") as compiled:
        assert compiled.feature_info("frames/32").provenance["config"]["run"] == {"compile": "eager"}
        assert compiled.feature_info("frames/32").fingerprint != plain.feature_info("frames/32").fingerprint
        ids = plain.clip_ids
        assert torch.equal(torch.from_numpy(compiled.get_many("frames/32", ids)), torch.from_numpy(plain.get_many("frames/32", ids)))
