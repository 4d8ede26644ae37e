"""``sample_frames(..., method="seek", threads=N)``: groups of times sought in parallel, one file each.

Extraction never comes here: it decodes one clip per worker process with ``threads=1``, where more
threads per clip only compete for the same cores. This path serves a caller decoding one clip at a
time with cores to spare, and ``scripts/bench/bench_frames.py``, which reports its two-thread
numbers beside the single-threaded ones (docs/datasets-and-decoding.md). It is imported only when
``threads > 1`` asks for it, and returns exactly the frames of the sequential sampler (tested).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from featurestore.decode._errors import PathLike
from featurestore.decode.video import _Counts, _open_video, _probe, _sample_with, _Sampler, sample_times, video_stream

#: Speed-up FFmpeg's frame threading gives per extra thread on H.264 (measured 1.54-1.55x with two
#: threads on 720p30 clips; docs/datasets-and-decoding.md). Used only to choose how to use threads.
_FRAME_THREADING_GAIN = 0.5


def seek_in_parallel(path: PathLike, n_frames: int, threads: int) -> tuple[list, _Counts]:
    """Seek groups of times that share no keyframe in parallel, one opened file per group.

    Groups are cut exactly where the sequential sampler would seek anyway, so together they
    decode the same frames as one sampler would; decoding releases the GIL, so the groups run
    on separate cores. When the largest group holds so much of the work that frame threading
    would finish sooner (one long GOP holding most targets), one file is decoded with frame
    threading instead.
    """
    with _open_video(path) as container:
        info = _probe(container, path)
        stream = video_stream(container)
        times = sample_times(info.duration, n_frames)
        groups = independent_groups(_Sampler(container, stream, path, info.fps), times, threads)
    total = sum(work for _, work in groups)
    if max(work for _, work in groups) * (1 + _FRAME_THREADING_GAIN * (threads - 1)) > total:
        return _sample_with(path, times, "seek", threads)
    per_group = max(1, threads // len(groups))
    with ThreadPoolExecutor(len(groups), thread_name_prefix="sample_frames") as pool:
        parts = list(pool.map(lambda group: _sample_with(path, group[0], "seek", per_group), groups))
    arrays = [a for part, _ in parts for a in part]
    return arrays, _Counts(sum(c.frames for _, c in parts), sum(c.packets for _, c in parts))


def independent_groups(sampler: _Sampler, times: list[float], max_groups: int) -> list[tuple[list[float], int]]:
    """Split ``times`` into at most ``max_groups`` runs that share no keyframe.

    A cut is made only where ``sampler.by_seeking`` would seek anyway (its drain plan: the next
    time's keyframe lies after the previous time), so the groups, sampled separately, decode
    exactly what one sampler would. Runs are balanced by the frames they span (keyframe to last
    time). Without timestamps there is one group.

    Returns:
        ``(times, frames spanned)`` per group.
    """
    if not sampler._tb:
        return [(times, 1)]
    targets = [sampler._ticks(t) for t in times]
    runs: list[list[int]] = []  # indices into times
    for i, cut in enumerate([True] + sampler._drain_plan(targets)[:-1]):
        if cut:
            runs.append([])
        runs[-1].append(i)
    cost = [max(1, (targets[r[-1]] - _start_of(sampler, targets[r[0]])) // sampler._frame_ticks) for r in runs]
    return [([times[i] for run in runs[a:b] for i in run], sum(cost[a:b]))
            for a, b in _balanced_split(cost, max_groups)]


def _start_of(sampler: _Sampler, target: int) -> int:
    """Where decoding for ``target`` starts: its keyframe, or the stream start without an index."""
    keyframe = sampler._keyframe_before(target)
    return sampler._start if keyframe is None else keyframe


def _balanced_split(costs: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``costs`` into at most ``parts`` contiguous ``[a, b)`` ranges, minimising the largest
    sum (exact dynamic programme; a clip has a dozen runs at most)."""
    n = len(costs)
    parts = max(1, min(parts, n))
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][j]: (largest sum, cut) splitting the first j costs into k ranges
    best = [[(math.inf, 0)] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0)
    for k in range(1, parts + 1):
        for j in range(1, n + 1):
            best[k][j] = min((max(best[k - 1][i][0], prefix[j] - prefix[i]), i) for i in range(j))
    k = min(range(1, parts + 1), key=lambda k: (best[k][n][0], k))  # fewest ranges among the best
    ranges, j = [], n
    while k:
        i = best[k][j][1]
        ranges.append((i, j))
        j, k = i, k - 1
    return ranges[::-1]
