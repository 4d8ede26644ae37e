"""The frame benchmark's ceiling for exact samplers rests on `required_packets`: check its claim.

The benchmark says no sampler returning exact frames can beat "decode only each target's keyframe
and the reference frames after it up to the target". That holds only if those packets suffice
(decoding them alone gives every sampled frame bit for bit) and are fewer than all packets.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
from tests.scripts_support import script_module

from featurestore.decode.video import _sample_frames



@pytest.fixture(scope="module")
def bench():
    with script_module("bench/bench_frames.py") as module:
        yield module


@pytest.mark.parametrize("gop", [6, 250])
def test_required_packets_alone_give_the_sampled_frames_bit_for_bit(tmp_path, bench, gop):
    path = bench.write_clip(tmp_path / "clip.mp4", gop, width=96, height=64, seconds=3.0)
    packets, needed, targets = bench.required_packets(path, 5)
    refs = [bool(bench._nal_ref_idc(bytes(p))) for p in packets]
    assert 0 < sum(refs) < len(packets)  # B-frames are on: some packets are not references
    assert set(targets) <= needed and len(needed) < len(packets)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = av.CodecContext.create(stream.codec_context.name, "r")
        ctx.extradata = stream.codec_context.extradata
        frames = [f for i, p in enumerate(packets) if i in needed for f in ctx.decode(p)]
        frames += list(ctx.decode(None))
    decoded = {f.pts: f.to_ndarray(format="rgb24") for f in frames}

    expected, _ = _sample_frames(path, 5, "decode_all")
    assert len(expected) == len(targets)
    for want, target in zip(expected, targets):
        np.testing.assert_array_equal(decoded[packets[target].pts], want)


def test_nal_ref_idc_reads_the_header_of_each_length_prefixed_unit(bench):
    sei = b"\x00\x00\x00\x02\x06\x05"  # SEI (type 6): ignored whatever its bits
    non_ref_slice = b"\x00\x00\x00\x02\x01\xaa"  # nal_ref_idc 0, type 1
    ref_slice = b"\x00\x00\x00\x02\x41\xaa"  # nal_ref_idc 2, type 1
    idr = b"\x00\x00\x00\x02\x65\xaa"  # nal_ref_idc 3, type 5
    assert bench._nal_ref_idc(sei + non_ref_slice) == 0
    assert bench._nal_ref_idc(sei + ref_slice) == 2
    assert bench._nal_ref_idc(non_ref_slice + idr) == 3
