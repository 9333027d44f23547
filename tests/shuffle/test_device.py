"""Device (GPU) payloads: memory hooks, allocators, codecs, wiring.

Every run, without a GPU: the CPU-side logic, with a fake device array type that
exposes ``__cuda_array_interface__`` over host memory. Such "device" buffers even
travel through the real UCX transport (UCX sees host pointers), so the memory-type
path of the wire is exercised end to end. A fake ``cupy`` module built on NumPy
(installed into ``sys.modules`` per test) drives the CuPy codec. Tests marked ``gpu``
run the same round trips with real CuPy, RMM, cuDF and CUDA transports, and are
skipped where CuPy cannot be imported or sees no device.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import types
import weakref
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shuffle._exceptions import FrameError
from shuffle._ids import RunId, ShardKey, ShuffleId
from shuffle._transport import BrokenTransportError, ProtocolError, TransportConfig, get_transport
from shuffle.device import _cuda, _cudf
from shuffle.device._allocator import RefusedFrame, refused_reason, transport_allocator
from shuffle.device._arrays import to_host
from shuffle.device._cai import cai_nbytes
from shuffle.device._cuda import cuda_hooks, cuda_registry, registry_for
from shuffle.device._cudf import decode_cudf, encode_cudf, pack_meta, unpack_meta
from shuffle.device._options import (
    CONFIG_KEY,
    DeviceMode,
    DeviceOptions,
    DeviceUnavailableError,
    actor_num_gpus,
)
from shuffle.wire._memory import HOST_REGISTRY, MemoryType
from shuffle.wire._message import allocate_buffers, decode_message, encode_message
from shuffle.wire._ndarray import ARRAY_TAG, decode_piece, encode_piece
from tests.shuffle.support import (
    F,
    FakeDeviceArray,
    cai_of,
    fake_allocate,
    gpu_usable,
    make_fake_cupy,
    needs_gpu,
    read_device,
    skip_without_ucx,
)

SECRET = b"d" * 32
WAIT = 20.0


# --------------------------------------------------------------------------- fakes


def needs_ucx(test: F) -> F:
    marked = pytest.mark.ucx(pytest.mark.usefixtures("loopback_only")(skip_without_ucx(test)))
    return marked  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- CAI and hooks


def test_cai_nbytes_accepts_contiguous_and_refuses_strided() -> None:
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert cai_nbytes(cai_of(a)) == 96
    # Extents of 1 may carry any stride; still contiguous.
    assert cai_nbytes({**cai_of(a[:1]), "strides": (999, 4)}) == 24
    with pytest.raises(ValueError, match=r"not C-contiguous.*ascontiguousarray"):
        cai_nbytes(cai_of(a[:, ::2]))
    with pytest.raises(ValueError, match="not a valid __cuda_array_interface__"):
        cai_nbytes({"shape": (3,)})
    assert cai_nbytes(cai_of(np.empty((0, 5), np.float64))) == 0


def test_cuda_hooks_wrap_as_a_flat_byte_view_that_keeps_its_owner() -> None:
    hooks = cuda_hooks(allocate=fake_allocate)
    arr = FakeDeviceArray(np.arange(12, dtype=np.int64).reshape(3, 4))
    assert hooks.owns(arr) and not hooks.owns(b"bytes") and not hooks.owns(np.zeros(3))
    pointer = arr.__cuda_array_interface__["data"][0]
    view = hooks.wrap(arr)
    cai = view.__cuda_array_interface__
    assert (cai["shape"], cai["typestr"], cai["data"][0]) == ((96,), "|u1", pointer)
    assert cai["stream"] == 1  # the producer's stream travels with the view
    assert hooks.nbytes(view) == hooks.nbytes(arr) == 96
    owner = weakref.ref(arr)
    del arr
    gc.collect()
    assert owner() is not None  # the view keeps the memory alive
    assert read_device(view).view(np.int64).tolist() == list(range(12))
    flat = FakeDeviceArray(np.zeros(5, np.uint8))
    assert hooks.wrap(flat) is flat  # already flat bytes: nothing to wrap


def test_registry_dispatches_by_memory_type() -> None:
    registry = cuda_registry(allocate=fake_allocate)
    assert registry.memory_type_of(FakeDeviceArray(np.zeros(2))) is MemoryType.CUDA
    assert registry.memory_type_of(np.zeros(2)) is MemoryType.HOST
    assert registry.memory_type_of(b"x") is MemoryType.HOST
    assert registry.hooks("cuda").nbytes(FakeDeviceArray(np.zeros(3))) == 24
    with pytest.raises(TypeError, match="neither a host buffer"):
        registry.memory_type_of(object())


def test_messages_carry_device_buffers_with_their_memory_type() -> None:
    registry = cuda_registry(allocate=fake_allocate)
    device = FakeDeviceArray(np.arange(10, dtype=np.float32))
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="transfer",
        shards=[(ShardKey(0, 1), device), (ShardKey(1, 1), b"host!")],
        registry=registry,
    )
    entries = message.header.entries
    assert [(e.memory_type, e.nbytes) for e in entries] == [
        (MemoryType.CUDA, 40),
        (MemoryType.HOST, 5),
    ]
    # The receiving side: allocate per entry, receive into it, validate.
    buffers = allocate_buffers(message.header, registry)
    assert isinstance(buffers[0], FakeDeviceArray)
    read_device(buffers[0])[:] = read_device(message.buffers[0])
    memoryview(buffers[1])[:] = b"host!"
    decoded = decode_message([message.frames()[0], *buffers], registry=registry)
    assert read_device(decoded.buffers[0]).view(np.float32).tolist() == list(range(10))
    with pytest.raises(FrameError, match="no hooks registered for 'cuda'"):
        decode_message([message.frames()[0], *buffers])  # host-only registry


def test_host_mode_refuses_device_payloads_naming_the_setting() -> None:
    registry = registry_for("host")
    device = FakeDeviceArray(np.zeros(4))
    with pytest.raises(DeviceUnavailableError, match=f"{CONFIG_KEY}: host"):
        encode_message(
            shuffle_id=ShuffleId("s"),
            run_id=RunId(1),
            sender="t",
            shards=[(ShardKey(0, 0), device)],
            registry=registry,
        )
    # Host payloads still travel.
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="t",
        shards=[(ShardKey(0, 0), b"ok")],
        registry=registry,
    )
    assert message.header.entries[0].memory_type is MemoryType.HOST


# --------------------------------------------------------------------------- allocators


def test_transport_allocator_receives_each_frame_into_its_memory_type() -> None:
    calls: list[int] = []

    def allocate(nbytes: int) -> FakeDeviceArray:
        calls.append(nbytes)
        return fake_allocate(nbytes)

    alloc = transport_allocator(cuda_registry(allocate=allocate), where="actor A")
    host = alloc(7, "host")
    assert isinstance(host, bytearray) and len(host) == 7
    device = alloc(16, "cuda")
    assert isinstance(device, FakeDeviceArray) and cai_nbytes(device.__cuda_array_interface__) == 16
    assert calls == [16]


@pytest.mark.parametrize(
    "allocate, message",
    [
        (lambda n: fake_allocate(n + 1), "returned 9 bytes, not 8"),
        (lambda n: bytearray(n), "does not expose __cuda_array_interface__"),
    ],
)
def test_transport_allocator_checks_what_the_device_allocator_returns(
    allocate: Any, message: str
) -> None:
    alloc = transport_allocator(cuda_registry(allocate=allocate), where="actor A")
    with pytest.raises(ProtocolError, match=message):
        alloc(8, "cuda")


def test_a_device_frame_at_a_host_only_process_fails_with_a_clear_error() -> None:
    alloc = transport_allocator(registry_for("host"), where="shuffle actor B")
    with pytest.raises(ProtocolError) as info:
        alloc(64, "cuda")
    text = str(info.value)
    assert "shuffle actor B cannot receive a 'cuda' frame of 64 bytes" in text
    assert f"{CONFIG_KEY}: host" in text and "GPU nodes" in text
    with pytest.raises(ProtocolError, match="no hooks registered"):
        transport_allocator(HOST_REGISTRY, where="x")(1, "cuda")


def test_drained_refusals_keep_the_reason_and_are_never_data() -> None:
    alloc = transport_allocator(registry_for("host"), where="shuffle actor D", drain_refused=True)
    frame = alloc(32, "cuda")
    assert isinstance(frame, RefusedFrame) and len(frame) == 32
    assert refused_reason([b"header", frame]) == frame.reason
    assert "shuffle actor D cannot receive a 'cuda' frame of 32 bytes" in frame.reason
    assert refused_reason([b"header", alloc(4, "host")]) is None
    # A drained frame is not device memory, so a run's decode would refuse it too.
    assert registry_for("host").memory_type_of(frame) is MemoryType.HOST


@pytest.mark.skipif(gpu_usable(), reason="this machine has a GPU")
def test_without_a_gpu_the_default_device_allocator_says_so() -> None:
    alloc = transport_allocator(cuda_registry(), where="shuffle actor C")
    with pytest.raises(ProtocolError, match=r"shuffle actor C .* no usable GPU"):
        alloc(8, "cuda")


def test_gpu_probe_prefers_rmm_then_cupy_and_reports_why_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(name: str) -> types.ModuleType:
        module = types.ModuleType(name)

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{name}: no CUDA driver")

        module.DeviceBuffer = broken  # type: ignore[attr-defined]
        module.empty = broken  # type: ignore[attr-defined]
        return module

    monkeypatch.setitem(sys.modules, "rmm", failing("rmm"))
    monkeypatch.setitem(sys.modules, "cupy", failing("cupy"))
    status = _cuda._probe()
    assert not status.usable and status.backend == "none"
    assert "rmm: RuntimeError: rmm: no CUDA driver" in status.reason
    assert "cupy: RuntimeError: cupy: no CUDA driver" in status.reason
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy())
    assert _cuda._probe().backend == "cupy"
    rmm = types.ModuleType("rmm")
    rmm.DeviceBuffer = lambda size: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rmm", rmm)
    assert _cuda._probe().backend == "rmm"


# --------------------------------------------------------------------------- options, actors


@pytest.mark.parametrize(
    "mode, node_gpus, expected",
    [
        ("auto", 0, 0.0),
        ("auto", 4, 0.25),
        ("cuda", 1, 0.25),
        ("host", 8, 0.0),
    ],
)
def test_actor_num_gpus(mode: Any, node_gpus: float, expected: float) -> None:
    options = DeviceOptions(mode=mode, actor_num_gpus=0.25)
    assert actor_num_gpus(options, node_gpus=node_gpus, node="n1") == expected


def test_cuda_mode_refuses_nodes_without_gpus() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"node n7 has no GPUs.*is cuda"):
        actor_num_gpus(DeviceOptions(mode="cuda"), node_gpus=0, node="n7")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "tpu"}, "device mode"),
        ({"results": "disk"}, "device results"),
        ({"actor_num_gpus": 1.5}, "actor_num_gpus"),
        ({"actor_num_gpus": True}, "actor_num_gpus"),
    ],
)
def test_device_options_are_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeviceOptions(**kwargs)


def test_service_reserves_gpus_on_gpu_nodes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from shuffle.shell import _service

    created: list[dict[str, Any]] = []
    monkeypatch.setattr(
        _service, "create_shuffle_actor", lambda **kwargs: created.append(kwargs) or object()
    )
    service = _service.ShuffleService(device=DeviceOptions(actor_num_gpus=0.1))
    service._node_gpus = {"gpu-node": 2.0, "cpu-node": 0.0}
    service._create("gpu-node", "10.0.0.1")
    service._create("cpu-node", "10.0.0.2")
    assert [(c["node_id"], c["num_gpus"]) for c in created] == [
        ("gpu-node", 0.1),
        ("cpu-node", 0.0),
    ]
    assert all(c["device"] is service.device for c in created)
    service._closed = True  # nothing was started


def test_actor_receives_with_the_allocator_of_its_device_mode() -> None:
    pytest.importorskip("ray")
    actor = in_process_actor(name="a0", mode="host")
    assert actor._config.allocator(3, "host") == bytearray(3)
    refused = actor._config.allocator(3, "cuda")
    assert "shuffle actor a0 cannot receive a 'cuda' frame" in refused_reason([refused])
    auto = in_process_actor(name="a1", mode="auto")
    assert auto.registry.memory_type_of(FakeDeviceArray(np.zeros(1))) is MemoryType.CUDA


def in_process_actor(*, name: str, mode: DeviceMode) -> Any:
    """A ``ShuffleActor`` object in this process (not a Ray actor), on loopback TCP."""
    from shuffle.shell._actor import ShuffleActor  # imports Ray: callers skip without it

    return ShuffleActor(
        name=name,
        secret=SECRET,
        transport="tcp",
        host="127.0.0.1",
        device=DeviceOptions(mode=mode),
    )


class ScriptedEndpoint:
    """Hands out given messages, then ends; records what was sent back."""

    name = "scripted"

    def __init__(self, *messages: list[Any]) -> None:
        self._messages = list(messages)
        self.sent: list[list[Any]] = []

    async def recv(self) -> list[Any]:
        from shuffle._transport import EndOfStream

        if not self._messages:
            raise EndOfStream("done")
        return self._messages.pop(0)

    async def send(self, frames: list[Any]) -> None:
        self.sent.append(frames)


async def test_actor_answers_a_refused_device_frame_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("ray")
    from shuffle._exceptions import RemoteShuffleError
    from shuffle.wire._reply import decode_reply

    actor = in_process_actor(name="a3", mode="host")
    frame = actor._config.allocator(8, "cuda")  # what the transport would receive into
    endpoint = ScriptedEndpoint([b"header", frame], [b"header", frame])
    try:
        with caplog.at_level(logging.WARNING, logger="shuffle.shell._actor"):
            await actor._serve(endpoint)  # type: ignore[arg-type]
    finally:
        await actor.close()
    assert len(endpoint.sent) == 2  # answered each message; the connection kept serving
    error = decode_reply(endpoint.sent[0], peer="a3")
    assert isinstance(error, RemoteShuffleError)
    assert "DeviceUnavailableError" in str(error) and f"{CONFIG_KEY}: host" in str(error)
    assert any("a3 refused a message" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(gpu_usable(), reason="this machine has a GPU")
async def test_cuda_mode_actor_without_a_gpu_fails_at_start() -> None:
    pytest.importorskip("ray")
    actor = in_process_actor(name="a2", mode="cuda")
    try:
        with pytest.raises(DeviceUnavailableError, match="shuffle actor a2 has no usable GPU"):
            await actor.start()
        assert actor._listener is None  # nothing was started
    finally:
        await actor.close()


# --------------------------------------------------------------------------- meta


def test_meta_round_trip_with_binary_tail() -> None:
    meta = pack_meta({"codec": "x", "n": [1, 2]}, b"\x00\xfftail")
    info, tail = unpack_meta(meta)
    assert info == {"codec": "x", "n": [1, 2]} and bytes(tail) == b"\x00\xfftail"
    with pytest.raises(ValueError):
        pack_meta({"codec": "x", "bad": float("nan")})


@pytest.mark.parametrize(
    "meta, match",
    [
        (b"RD", "truncated"),
        (b"XXXX\x00\x00\x00\x00", "magic"),
        (b"RDC1\xff\x00\x00\x00{}", "announces 255 JSON bytes"),
        (b"RDC1\x02\x00\x00\x00[]", "names no codec"),
        (b"RDC1\x03\x00\x00\x00{x}", "not valid JSON"),
        (b"RDC1\x02\x00\x00\x00\xff\xfe", "not valid JSON"),
        (object(), "not a byte buffer"),
    ],
)
def test_corrupt_meta_raises_frame_error(meta: Any, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        unpack_meta(meta)


@given(st.binary(max_size=64))
def test_arbitrary_meta_bytes_never_raise_anything_but_frame_error(raw: bytes) -> None:
    for candidate in (raw, b"RDC1" + raw):
        with contextlib.suppress(FrameError):
            unpack_meta(candidate)
    for candidate in (raw, ARRAY_TAG + raw):
        with contextlib.suppress(FrameError):
            decode_piece(candidate, b"")


# --------------------------------------------------------------------------- arrays


def _has_titles(dtype: np.dtype) -> bool:
    if dtype.subdtype is not None:
        return _has_titles(dtype.subdtype[0])
    fields = dtype.fields or {}
    return any(len(f) > 2 or _has_titles(f[0]) for f in fields.values())


DTYPES = st.one_of(
    hnp.scalar_dtypes(),
    hnp.nested_dtypes(max_itemsize=64).filter(lambda d: not _has_titles(d)),
    st.sampled_from([np.dtype(">u4"), np.dtype("U4"), np.dtype("S2"), np.dtype("<m8[s]")]),
)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_numpy_round_trip_for_many_dtypes_and_shapes(arr: np.ndarray) -> None:
    piece = encode_piece(arr)
    out = decode_piece(piece.meta, bytearray(piece.data))  # as a transport would receive it
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


def test_array_codec_copies_strided_input_and_refuses_object_dtype() -> None:
    base = np.arange(20, dtype=np.int16).reshape(4, 5)
    piece = encode_piece(base[:, ::2])
    np.testing.assert_array_equal(decode_piece(piece.meta, piece.data), base[:, ::2])
    with pytest.raises(TypeError, match=r"dtype object .* hold Python objects"):
        encode_piece(np.array([1, "a"], dtype=object))
    with pytest.raises(TypeError, match="hold Python objects"):
        encode_piece(np.zeros(2, dtype=[("a", "i4"), ("o", "O")]))
    titled = np.dtype({"names": ["a"], "formats": ["<i4"], "titles": ["A title"]})
    with pytest.raises(TypeError, match="no portable description"):
        encode_piece(np.zeros(2, dtype=titled))


def array_meta(description: Any) -> bytes:
    return ARRAY_TAG + json.dumps(description).encode()


def test_array_meta_from_the_network_is_checked() -> None:
    piece = encode_piece(np.arange(6, dtype=np.float64))
    with pytest.raises(FrameError, match="needs 48 bytes, got 40"):
        decode_piece(piece.meta, bytes(piece.data)[:40])
    with pytest.raises(FrameError, match="invalid array piece shape"):
        decode_piece(array_meta({"dtype": {"descr": "<f8"}, "shape": [-1]}), b"")
    with pytest.raises(FrameError, match="holds Python objects"):
        decode_piece(array_meta({"dtype": {"descr": "|O"}, "shape": [1]}), bytes(8))
    with pytest.raises(FrameError, match="invalid dtype"):
        decode_piece(array_meta({"dtype": "not a dtype", "shape": []}), b"")
    with pytest.raises(FrameError, match="unknown kind tag"):
        decode_piece(b"numpy\0{}", b"")


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(30, dtype=np.complex128).reshape(2, 3, 5)[:, ::2],  # strided
        np.array(True),
        np.empty((0, 7), dtype=np.int8),
    ],
    ids=["2d", "strided", "0d", "empty"],
)
def test_cupy_pieces_round_trip_through_device_buffers(
    fake_cupy: types.ModuleType, arr: np.ndarray
) -> None:
    device = FakeDeviceArray(arr)
    piece = encode_piece(device)
    assert piece.meta.startswith(ARRAY_TAG) and piece.nbytes == arr.nbytes
    assert hasattr(piece.data, "__cuda_array_interface__")  # never staged through host
    assert fake_cupy.syncs == 1  # the producer's stream was waited for before sending
    registry = cuda_registry(allocate=fake_allocate)
    frame = registry.hooks("cuda").wrap(piece.data)
    # "Receive": allocate a fresh device buffer and copy the bytes in.
    nbytes = cai_nbytes(frame.__cuda_array_interface__)
    received = transport_allocator(registry, where="r")(nbytes, "cuda")
    read_device(received)[:] = read_device(frame)
    out = decode_piece(piece.meta, received)
    assert isinstance(out, FakeDeviceArray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out.host, arr)


def test_cupy_piece_refusals(fake_cupy: types.ModuleType) -> None:
    with pytest.raises(TypeError, match="CuPy holds numbers only"):
        encode_piece(FakeDeviceArray(np.zeros(2, dtype=[("a", "i4")])))
    meta = encode_piece(np.zeros(4, np.float32)).meta
    with pytest.raises(FrameError, match="needs 16 bytes, got 8"):
        decode_piece(meta, fake_allocate(8))
    structured = array_meta({"dtype": {"descr": [["a", "<i4"]]}, "shape": [1]})
    with pytest.raises(FrameError, match="CuPy cannot hold"):
        decode_piece(structured, fake_allocate(4))


def test_one_meta_two_memories(fake_cupy: types.ModuleType) -> None:
    """The same array meta decodes to NumPy from host memory, to CuPy from device."""
    arr = np.arange(8, dtype=np.uint16)
    piece = encode_piece(arr)
    host = decode_piece(piece.meta, bytearray(piece.data))
    device = decode_piece(piece.meta, FakeDeviceArray(arr.view(np.uint8).copy()))
    assert isinstance(host, np.ndarray) and isinstance(device, FakeDeviceArray)
    np.testing.assert_array_equal(host, device.host)


def test_to_host_copies_device_arrays_and_leaves_host_objects(fake_cupy: types.ModuleType) -> None:
    arr = np.arange(3.0)
    out = to_host(FakeDeviceArray(arr))
    assert isinstance(out, np.ndarray) and out.tolist() == [0.0, 1.0, 2.0]
    frame = pd.DataFrame({"a": [1]})
    assert to_host(frame) is frame


def test_without_cupy_a_device_array_cannot_be_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    meta = encode_piece(np.zeros(2, np.float32)).meta
    with pytest.raises(DeviceUnavailableError, match="CuPy cannot be imported here"):
        decode_piece(meta, fake_allocate(8))


# --------------------------------------------------------------------------- cuDF (CPU side)


@pytest.fixture
def pandas_as_cudf(monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame checks use only pandas-compatible API; exercise them on pandas."""
    cudf = types.ModuleType("cudf")
    cudf.DataFrame = pd.DataFrame  # type: ignore[attr-defined]
    cudf.RangeIndex = pd.RangeIndex  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cudf", cudf)


def test_cudf_frame_info_keeps_labels_and_index(pandas_as_cudf: None) -> None:
    df = pd.DataFrame({"a": [1, 2], 5: [0.5, 1.5]}, index=pd.RangeIndex(10, 14, 2, name="r"))
    df.columns.name = "cols"
    info, frame = _cudf._frame_info(df)
    assert info["columns"] == ["a", 5] and info["columns_name"] == "cols"
    assert info["index"] == {"kind": "range", "start": 10, "stop": 14, "step": 2, "name": "r"}
    assert frame is df  # a RangeIndex travels as numbers, not as a column
    multi = df.set_index([pd.Index(["x", "y"]), pd.Index([7, 8])])
    multi.index.names = ["k", None]
    info, frame = _cudf._frame_info(multi)
    assert info["index"] == {
        "kind": "columns",
        "names": ["k", None],
        "slots": ["__index_level_0__", "__index_level_1__"],
    }
    assert list(frame.columns) == ["__index_level_0__", "__index_level_1__", "a", 5]
    assert multi.index.names == ["k", None]  # the caller's frame is untouched
    assert info["dtypes"] == ["int64", "float64"]


@pytest.mark.parametrize(
    "df, match",
    [
        (pd.DataFrame({("a", "b"): [1]}), "labels must be str, int or None"),
        (pd.DataFrame([[1, 2]], columns=["a", "a"]), "duplicate column labels"),
        (pd.DataFrame({"c": pd.Categorical(["x"])}), "categorical columns"),
        (pd.DataFrame({"__index_level_0__": [1]}, index=[3]), "columns named like"),
    ],
)
def test_cudf_frame_info_refusals(pandas_as_cudf: None, df: pd.DataFrame, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        _cudf._frame_info(df)


def test_cudf_meta_from_the_network_is_checked_before_cudf_is_needed() -> None:
    with pytest.raises(FrameError, match="cudf payload meta is malformed"):
        decode_cudf(pack_meta({"codec": "cudf", "columns": ["a"]}), fake_allocate(1))
    good = {"codec": "cudf", "columns": [], "dtypes": [], "index": {"kind": "range"}}
    with pytest.raises(FrameError, match="needs a device buffer"):
        decode_cudf(pack_meta(good), bytearray(1))
    with pytest.raises(FrameError, match="expected cudf payload meta"):
        decode_cudf(pack_meta({"codec": "ndarray"}), fake_allocate(1))


# --------------------------------------------------------------------------- over UCX


async def _send_over_ucx(
    frames: list[Any], receiver_registry: Any, *, drain_refused: bool = False
) -> tuple[list[Any] | None, BaseException | None]:
    """Send one message client -> listener: what the listener received, or the error the
    sender saw (on sending, or when waiting for a reply the dropped listener never sent)."""
    received: asyncio.Queue[list[Any]] = asyncio.Queue()
    config = TransportConfig(
        secret=SECRET,
        allocator=transport_allocator(
            receiver_registry, where="test receiver", drain_refused=drain_refused
        ),
    )
    transport = get_transport("ucx", config=config)
    try:

        async def handler(ep: Any) -> None:
            await received.put(await ep.recv())

        listener = await transport.listen("127.0.0.1", 0, handler)
        client = await asyncio.wait_for(transport.connect(listener.address), WAIT)
        try:
            await asyncio.wait_for(client.send(frames), WAIT)
            replied = asyncio.ensure_future(client.recv())
            got = asyncio.ensure_future(received.get())
            done, _ = await asyncio.wait(
                {replied, got}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED
            )
            for future in (replied, got):
                if future not in done:
                    future.cancel()
            await asyncio.gather(replied, got, return_exceptions=True)
            if got in done:
                return got.result(), None
            assert replied in done, "neither a delivery nor a failure within the deadline"
            return None, replied.exception()
        except BrokenTransportError as e:
            return None, e
        finally:
            client.abort()
    finally:
        await asyncio.wait_for(transport.close(), WAIT)


@needs_ucx
async def test_fake_device_frames_travel_over_ucx_into_device_buffers() -> None:
    arr = np.arange(4096, dtype=np.float64).reshape(64, 64)
    registry = cuda_registry(allocate=fake_allocate)
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="t",
        shards=[(ShardKey(0, 0), FakeDeviceArray(arr)), (ShardKey(1, 0), b"host")],
        registry=registry,
    )
    frames, error = await _send_over_ucx(message.frames(), registry)
    assert error is None and frames is not None
    assert isinstance(frames[1], FakeDeviceArray) and isinstance(frames[2], bytearray)
    decoded = decode_message(frames, registry=registry)
    assert read_device(decoded.buffers[0]).view(np.float64).tolist() == arr.ravel().tolist()


@needs_ucx
async def test_a_device_frame_at_a_host_only_receiver_drops_the_connection_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shuffle.transport")
    device = FakeDeviceArray(np.zeros(256, np.uint8))
    frames, error = await _send_over_ucx([b"header", device], registry_for("host"))
    # The sender sees the dropped connection (on send, or when waiting for its reply).
    assert frames is None and isinstance(error, BrokenTransportError), (frames, error)
    assert any(
        "cannot receive a 'cuda' frame of 256 bytes" in r.getMessage()
        and f"{CONFIG_KEY}: host" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


@needs_ucx
async def test_a_drained_device_frame_reaches_the_receiver_as_a_refusal() -> None:
    device = FakeDeviceArray(np.arange(256, dtype=np.uint8))
    frames, error = await _send_over_ucx(
        [b"header", device], registry_for("host"), drain_refused=True
    )
    assert error is None and frames is not None
    assert isinstance(frames[1], RefusedFrame) and len(frames[1]) == 256
    assert "test receiver cannot receive a 'cuda' frame of 256 bytes" in str(refused_reason(frames))


# --------------------------------------------------------------------------- real GPUs


@pytest.mark.parametrize(
    "dtype, shape", [("float64", (257, 3)), ("int8", (0, 4)), ("complex64", ()), ("bool", (9,))]
)
@needs_gpu
def test_gpu_cupy_round_trip_through_rmm_buffers(dtype: str, shape: tuple[int, ...]) -> None:
    import cupy

    arr = (cupy.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    piece = encode_piece(arr)
    frame = cuda_registry().hooks("cuda").wrap(piece.data)
    nbytes = cai_nbytes(frame.__cuda_array_interface__)
    received = transport_allocator(cuda_registry(), where="r")(nbytes, "cuda")
    if nbytes:
        cupy.asarray(received).view(cupy.uint8)[:] = cupy.asarray(frame).view(cupy.uint8)
    out = decode_piece(piece.meta, received)
    assert isinstance(out, cupy.ndarray) and out.dtype == arr.dtype and out.shape == arr.shape
    cupy.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(to_host(out), cupy.asnumpy(arr))


@needs_gpu
@pytest.mark.parametrize("index", ["range", "named", "multi", "empty"])
def test_gpu_cudf_round_trip(index: str) -> None:
    cudf = pytest.importorskip("cudf")
    pdf = pd.DataFrame(
        {
            "i": np.arange(6, dtype=np.int32),
            "f": [0.5, None, 2.5, 3.5, None, 5.5],
            "s": ["a", "bb", None, "dddd", "", "f"],
            "t": pd.date_range("2026-01-01", periods=6, freq="h"),
            3: [True, False] * 3,
        }
    )
    if index == "named":
        pdf.index = pd.Index(np.arange(6) * 10, name="k")
    elif index == "multi":
        pdf = pdf.set_index(["s", "i"], drop=False).rename_axis(["s_idx", None])
        pdf.columns = [f"c{i}" for i in range(len(pdf.columns))]
    elif index == "empty":
        pdf = pdf.iloc[:0]
    df = cudf.from_pandas(pdf)
    meta, buffer = encode_cudf(df)
    frame = cuda_registry().hooks("cuda").wrap(buffer)
    out = decode_cudf(meta, frame)
    pd.testing.assert_frame_equal(out.to_pandas(), df.to_pandas())
    pd.testing.assert_frame_equal(to_host(out), df.to_pandas())


@needs_gpu
@needs_ucx
async def test_gpu_device_to_device_frame_over_ucx() -> None:
    import cupy

    arr = cupy.arange(1 << 20, dtype=cupy.float32).reshape(1024, 1024)
    piece = encode_piece(arr)
    registry = cuda_registry()
    message = encode_message(
        shuffle_id=ShuffleId("s"),
        run_id=RunId(1),
        sender="t",
        shards=[(ShardKey(0, 0), piece)],
        registry=registry,
    )
    frames, error = await _send_over_ucx(message.frames(), registry)
    assert error is None and frames is not None
    assert not isinstance(frames[1], (bytes, bytearray, memoryview))  # landed on the device
    decoded = decode_message(frames, registry=registry)
    out = decode_piece(decoded.header.entries[0].meta, decoded.buffers[0])
    cupy.testing.assert_array_equal(out, arr)


def test_run_handles_carry_the_device_settings_to_senders() -> None:
    import pickle

    from shuffle._spec import ShuffleRunSpec
    from shuffle.shell._handle import RunHandle

    spec = ShuffleRunSpec(
        shuffle_id=ShuffleId("s"), run_id=RunId(1), npartitions_out=2, participants=("a",)
    )
    device = DeviceOptions(mode="host", actor_num_gpus=0.5, results="host")
    handle = RunHandle(
        spec=spec,
        meta=pd.DataFrame({"_partitions": []}),
        addresses={"a": "tcp://h:1"},
        secret=SECRET,
        transport="tcp",
        device=device,
    )
    assert pickle.loads(pickle.dumps(handle)).device == device


@pytest.mark.ray
def test_on_a_cluster_without_gpus_actors_reserve_none(ray_session: Any) -> None:
    from shuffle.shell._service import ShuffleService

    if any(n["Resources"].get("GPU", 0) for n in ray_session.nodes() if n["Alive"]):
        pytest.skip("this Ray cluster has GPUs")
    cuda_only = ShuffleService(transport="tcp", device=DeviceOptions(mode="cuda"))
    with cuda_only, pytest.raises(DeviceUnavailableError, match=r"has no GPUs.*is cuda"):
        cuda_only.actors()  # refused before any actor is created
    with ShuffleService(transport="tcp", actors_per_node=1) as service:
        (actor,) = service.actors()
        status = ray_session.get(actor.handle.gpu_status.remote(), timeout=60)
    if not gpu_usable():
        assert not status.usable and status.backend == "none" and "rmm:" in status.reason
