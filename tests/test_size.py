"""Fast sizing (cost.size, from artifact.layout) computes exactly the bytes the writer produces,
without building the payload: same header, same stream lengths, for every kind of plan."""
from __future__ import annotations

import os

import pytest

from autocompress import artifact
from autocompress.compression import compress
from autocompress.cost import artifact_size, size_breakdown
from autocompress.models import ModelSpec
from autocompress.plan import CompressionPlan, LayerPlan

SPEC = ModelSpec("lenet5", 10, 1, 28)
L = ("conv1", "conv2", "fc1", "fc2")

PLANS = {
    "dense 32": CompressionPlan(layers={n: LayerPlan() for n in L}),
    "dense 4": CompressionPlan(layers={n: LayerPlan(bits=4) for n in L}),
    "unstructured": CompressionPlan(layers={n: LayerPlan(prune="unstructured", amount=a, bits=b)
                                            for n, a, b in zip(L, (0.3, 0.6, 0.97, 0.5), (8, 5, 3, 6))}),
    "sparse float": CompressionPlan(layers={"fc1": LayerPlan(prune="unstructured", amount=0.9, bits=16),
                                            "conv2": LayerPlan(prune="unstructured", amount=0.5)}),
    "n:m": CompressionPlan(layers={"conv2": LayerPlan(prune="nm", n=2, m=4, bits=4),
                                   "fc1": LayerPlan(prune="nm", n=1, m=8, bits=2)}),
    "block": CompressionPlan(layers={"fc1": LayerPlan(prune="block", amount=0.8, block_size=8, bits=4),
                                     "conv2": LayerPlan(prune="block", amount=0.5, block_size=4, bits=3)}),
    "channel": CompressionPlan(layers={"conv1": LayerPlan(prune="channel", amount=0.5, bits=8),
                                       "fc1": LayerPlan(prune="channel", amount=0.3, bits=4)}),
    "low rank": CompressionPlan(layers={"fc1": LayerPlan(rank_ratio=0.25, bits=4, prune="unstructured", amount=0.5),
                                        "conv2": LayerPlan(rank_ratio=0.5, bits=6)}),
    "floats 16": CompressionPlan(layers={"fc1": LayerPlan(bits=4, prune="unstructured", amount=0.9)}, float_bits=16),
    "act bits": CompressionPlan(layers={"conv2": LayerPlan(bits=4, act_bits=8),
                                        "fc1": LayerPlan(bits=4, act_bits=4, prune="unstructured", amount=0.95)}),
    "1 bit asym": CompressionPlan(layers={"fc1": LayerPlan(bits=1, prune="unstructured", amount=0.9),
                                          "conv2": LayerPlan(bits=3, symmetric=False, prune="unstructured",
                                                             amount=0.99)}),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_sizing_equals_the_written_artifact(lenet, data, tmp_path, name):
    c = compress(lenet, PLANS[name], data[0][:1], data[1][:1], calibrate=name == "act bits")
    header = artifact.layout(c, SPEC)  # from masks and shapes only
    written_header, streams = artifact.encode(c, SPEC)
    assert header == written_header  # the same entries, codecs and stream lengths
    n = 0
    for e in header["entries"]:  # each entry's streams are the lengths its header entry gives
        want = artifact.chunk_sizes(e)
        assert [len(s) for s in streams[n:n + len(want)]] == want
        n += len(want)
    assert n == len(streams)
    path = tmp_path / "m.acz"
    assert artifact_size(c, SPEC) == artifact.export(c, path, SPEC) == os.path.getsize(path)
    parts = size_breakdown(c, SPEC)
    assert parts["total"] == os.path.getsize(path) == sum(v for k, v in parts.items() if k != "total")


def test_rice_sizes_from_runs_equal_the_gaps_coded():
    """mask_code sizes Rice streams from the mask's runs; the writer codes the gaps themselves."""
    import numpy as np

    from autocompress.compression import codec

    rng = np.random.default_rng(0)
    masks = [rng.random(n) < d for n in (1, 2, 9, 64, 1000) for d in (0.0, 0.02, 0.5, 0.97, 1.0)]
    masks += [np.repeat(rng.random(40) < 0.3, 25), np.array([True, False, False, True, True, False])]
    for m in masks:
        info, streams = codec.encode_mask(m, (2, 4) if m.size % 4 == 0 else None)
        assert (codec.decode_mask(info, streams, m.size) == m).all()
        for invert, gaps in zip((False, True), codec._run_gaps(m)):
            full = codec.gaps_of(m != invert)
            assert sorted(gaps.tolist()) == sorted(full[full > 0].tolist())
        sizes = [codec.nbytes(m.size)] + [codec.best_rice_k(codec.gaps_of(m != inv))[1] for inv in (False, True)]
        assert sum(map(len, streams)) <= min(sizes)


def test_mask_code_is_the_cheapest_coding_even_when_rice_is_skipped():
    """mask_code skips the Rice codings whose lower bound cannot beat the bitmap or the N:M index
    (dense N:M masks have millions of runs); the size it picks is still the least of all codings."""
    import numpy as np

    from autocompress.compression import codec

    rng = np.random.default_rng(3)
    for i in range(400):
        size = int(rng.integers(4, 2000)) // 4 * 4
        if i % 2:
            mask = np.zeros((size // 4, 4), dtype=bool)
            np.put_along_axis(mask, np.argsort(rng.random((size // 4, 4)), axis=1)[:, :2], True, axis=1)
            mask, nm = mask.ravel(), (2, 4)
        else:
            mask, nm = rng.random(size) < rng.choice([0.001, 0.02, 0.3, 0.5, 0.9, 0.999]), None
        options = [codec.nbytes(size)] + [codec.best_rice_k(codec.gaps_of(mask != inv))[1] for inv in (False, True)]
        if nm:
            options.append(codec.nbytes(size // 4 * codec.nm_width(2, 4)))
        info, sizes = codec.mask_code(mask, nm)
        assert sum(sizes) == min(options)
        _, streams = codec.encode_mask(mask, nm)
        assert [len(s) for s in streams] == sizes and (codec.decode_mask(info, streams, size) == mask).all()
