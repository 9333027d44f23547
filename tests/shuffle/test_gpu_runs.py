"""GPU partitions through shuffle runs: CuPy rechunk pieces and cuDF shuffle pieces.

The dispatch (which codec a chunk or frame takes, and that device pieces are kept
as device buffers) is checked on every run with the fake CuPy of ``test_device``;
the round trips through runs wired in memory need a real GPU (marked ``gpu``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shuffle._ids import RunId, ShuffleId
from shuffle._options import RunOptions
from shuffle._rechunk import RechunkLayout
from shuffle._spec import ShuffleRunSpec
from shuffle.device._cuda import registry_for
from shuffle.device._cudf import is_cudf_frame
from shuffle.wire._ndarray import decode_piece, encode_piece
from tests.shuffle.support import FakeDeviceArray, Network, needs_gpu


def test_cupy_chunks_stay_on_the_device(fake_cupy: Any) -> None:
    chunk = FakeDeviceArray(np.arange(12, dtype="f4").reshape(3, 4))
    piece = encode_piece(chunk)
    assert piece.meta.startswith(b"array\0") and piece.nbytes == 48
    assert hasattr(piece.data, "__cuda_array_interface__")  # never staged through host
    back = decode_piece(piece.meta, piece.data)
    assert isinstance(back, FakeDeviceArray)
    np.testing.assert_array_equal(back.host, chunk.host)
    host = encode_piece(np.arange(3))
    assert host.meta.startswith(b"array\0")  # one meta for both memories


def test_pandas_frames_are_not_cudf_frames() -> None:
    assert not is_cudf_frame(pd.DataFrame({"a": [1]}))
    assert not is_cudf_frame(np.zeros(1))


def copy_device_frames(frames: Sequence[Any]) -> list[Any]:
    """Device frames copied on the device, host frames on the host."""
    import cupy

    return [
        cupy.array(cupy.asarray(f), copy=True)
        if hasattr(f, "__cuda_array_interface__")
        else bytearray(f)
        for f in frames
    ]


def device_network(names: list[str]) -> Network:
    """Managers with the CUDA registry, whose wire copies device frames on the device."""
    return Network(
        names, options=RunOptions(), registry=registry_for("cuda"), copy=copy_device_frames
    )


def _spec(wire: Network, n: int) -> ShuffleRunSpec:
    return ShuffleRunSpec(
        shuffle_id=ShuffleId("gpu"),
        run_id=RunId(1),
        npartitions_out=n,
        participants=tuple(wire.managers),
    )


@needs_gpu
async def test_gpu_cupy_rechunk_through_runs() -> None:
    import cupy

    a = cupy.arange(12 * 10, dtype="f8").reshape(12, 10)
    layout = RechunkLayout(((4, 4, 4), (10,)), ((12,), (3, 3, 4)))
    wire = device_network(["a", "b"])
    spec = _spec(wire, layout.npartitions_out)
    runs = {n: await m.get_or_create(spec, layout) for n, m in wire.managers.items()}
    for i in range(3):
        sender = "a" if i % 2 else "b"
        await wire.send_input(sender, a[4 * i : 4 * i + 4], i, spec=spec, meta=layout)
    for run in runs.values():
        run.inputs_done()
    for p, cols in enumerate([(0, 3), (3, 6), (6, 10)]):
        out = runs[spec.owner_of(p)].get_output_partition(p)
        assert isinstance(out, cupy.ndarray)
        cupy.testing.assert_array_equal(out, a[:, cols[0] : cols[1]])
    await asyncio.gather(*(m.close() for m in wire.managers.values()))


@needs_gpu
async def test_gpu_cudf_shuffle_through_runs() -> None:
    cudf = pytest.importorskip("cudf")
    pdf = pd.DataFrame(
        {"k": np.arange(40) % 7, "v": np.arange(40.0), "_partitions": np.arange(40) % 3}
    )
    wire = device_network(["a", "b"])
    spec = _spec(wire, 3)
    meta = cudf.from_pandas(pdf.iloc[:0])
    runs = {n: await m.get_or_create(spec, meta) for n, m in wire.managers.items()}
    for i, part in enumerate([pdf.iloc[:20], pdf.iloc[20:]]):
        await wire.send_input("a" if i else "b", cudf.from_pandas(part), i, spec=spec, meta=meta)
    for run in runs.values():
        run.inputs_done()
    for p in range(3):
        out = runs[spec.owner_of(p)].get_output_partition(p)
        assert is_cudf_frame(out)
        expected = pdf[pdf._partitions == p].drop(columns="_partitions")
        pd.testing.assert_frame_equal(out.to_pandas(), expected)
    await asyncio.gather(*(m.close() for m in wire.managers.values()))
