"""The transports' wire format and outgoing frame checks, shared by TCP, UCX and local.

* the wire header (``encode_frame_header``/``decode_prefix``/``decode_sizes``), used by TCP and
  UCX alike so that limits are enforced identically, and ``coalesce_groups``, which
  small host frames travel together;
* ``prepare_frames``: validate outgoing frames once, as flat byte views (``OutFrame``).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any

from shuffle.device._cai import cai_nbytes

from ._errors import ProtocolError, TransportUsageError
from .base import FrameLimits, MemoryType

# --------------------------------------------------------------------------- wire format
#
# header := prefix sizes memtypes
# prefix := magic "RO" | version u8 | kind u8 | nframes u32        (little-endian, 8 bytes)
# sizes  := nframes x u64 frame length;  memtypes := nframes x u8 (0 host, 1 cuda)
# The frames follow, in order, with no padding. GOODBYE has no frames.

FRAME_PREFIX = struct.Struct("<2sBBI")
FRAME_MAGIC = b"RO"
FRAME_VERSION = 1
KIND_DATA = 1
KIND_GOODBYE = 2
_MEMTYPE_CODES: dict[MemoryType, int] = {"host": 0, "cuda": 1}
_MEMTYPE_NAMES: tuple[MemoryType, ...] = ("host", "cuda")


#: Host frames up to this size travel coalesced with their neighbours (see
#: ``coalesce_groups``); UCX costs ~17 us per tag message here, a memcpy of 64 KiB ~5.
COALESCE_FRAME_BYTES = 64 * 2**10
#: At most this many bytes in one coalesced wire buffer.
COALESCE_GROUP_BYTES = 4 * 2**20


def coalesce_groups(
    sizes: Sequence[int],
    memtypes: Sequence[MemoryType],
    *,
    frame_bytes: int = COALESCE_FRAME_BYTES,
    group_bytes: int = COALESCE_GROUP_BYTES,
) -> list[tuple[int, ...]]:
    """Which frames travel together, in order: runs of small host frames become one
    wire buffer, every other non-empty frame travels alone; empty frames not at all.

    Pure and deterministic, so sender and receiver derive the same plan from the
    header alone; the wire format does not change.
    """
    groups: list[tuple[int, ...]] = []
    run: list[int] = []
    total = 0
    for i, (size, memtype) in enumerate(zip(sizes, memtypes, strict=True)):
        if not size:
            continue
        if memtype == "host" and size <= frame_bytes:
            if run and total + size > group_bytes:
                groups.append(tuple(run))
                run, total = [], 0
            run.append(i)
            total += size
            continue
        if run:
            groups.append(tuple(run))
            run, total = [], 0
        groups.append((i,))
    if run:
        groups.append(tuple(run))
    return groups


def frame_header_nbytes(nframes: int) -> int:
    return FRAME_PREFIX.size + 9 * nframes


def encode_frame_header(kind: int, frames: Sequence[OutFrame]) -> bytes:
    n = len(frames)
    return FRAME_PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, kind, n) + struct.pack(
        f"<{n}Q{n}B",
        *(f.nbytes for f in frames),
        *(_MEMTYPE_CODES[f.memory_type] for f in frames),
    )


def decode_prefix(buf: bytes | bytearray | memoryview, limits: FrameLimits) -> tuple[int, int]:
    """Return ``(kind, nframes)``; raise ``ProtocolError`` before anything is allocated."""
    magic, version, kind, nframes = FRAME_PREFIX.unpack_from(buf)
    if magic != FRAME_MAGIC or version != FRAME_VERSION:
        raise ProtocolError(f"not a message header (magic {magic!r}, version {version})")
    if kind == KIND_GOODBYE:
        if nframes:
            raise ProtocolError(f"goodbye message with {nframes} frames")
    elif kind != KIND_DATA:
        raise ProtocolError(f"unknown message kind {kind}")
    if nframes > limits.max_frames:
        raise ProtocolError(f"{nframes} frames exceed the limit of {limits.max_frames}")
    return kind, nframes


def check_sizes(sizes: Sequence[int], limits: FrameLimits) -> None:
    """Raise ``ProtocolError`` if a received message's frames exceed ``limits``."""
    if len(sizes) > limits.max_frames:
        raise ProtocolError(f"{len(sizes)} frames exceed the limit of {limits.max_frames}")
    if sizes and max(sizes) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {max(sizes)} bytes exceeds {limits.max_frame_bytes}")
    if sum(sizes) > limits.max_message_bytes:
        raise ProtocolError(f"message of {sum(sizes)} bytes exceeds {limits.max_message_bytes}")


def decode_sizes(
    buf: bytes | bytearray | memoryview, nframes: int, limits: FrameLimits, offset: int = 0
) -> tuple[list[int], list[MemoryType]]:
    """Frame sizes and memory types, checked against ``limits``."""
    values = struct.unpack_from(f"<{nframes}Q{nframes}B", buf, offset)
    sizes = list(values[:nframes])
    check_sizes(sizes, limits)
    try:
        memtypes = [_MEMTYPE_NAMES[code] for code in values[nframes:]]
    except IndexError:
        raise ProtocolError(f"unknown memory type in {values[nframes:]!r}") from None
    return sizes, memtypes


# --------------------------------------------------------------------------- frames


@dataclasses.dataclass(frozen=True)
class OutFrame:
    """A validated outgoing frame: a flat byte view (host) or the device object."""

    data: Any
    nbytes: int
    memory_type: MemoryType


def _device_nbytes(frame: Any, who: str) -> int:
    try:
        return cai_nbytes(frame.__cuda_array_interface__)
    except ValueError as e:
        raise TransportUsageError(f"{who}: device frames must be C-contiguous ({e})") from None


def prepare_frames(
    frames: Sequence[Any], limits: FrameLimits, *, allow_device: bool, who: str
) -> list[OutFrame]:
    """Validate a message against ``limits`` and return flat views of its frames."""
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise TransportUsageError(f"{who}: a message is a sequence of frames, got {type(frames)}")
    if len(frames) > limits.max_frames:
        raise TransportUsageError(f"{who}: {len(frames)} frames exceed {limits.max_frames}")
    out: list[OutFrame] = []
    total = 0
    for frame in frames:
        if hasattr(frame, "__cuda_array_interface__"):
            if not allow_device:
                raise TransportUsageError(f"{who}: this transport carries host frames only")
            item = OutFrame(frame, _device_nbytes(frame, who), "cuda")
        else:
            try:
                view = memoryview(frame)
            except TypeError:
                raise TransportUsageError(
                    f"{who}: frame of type {type(frame).__name__} is not a buffer"
                ) from None
            if not view.c_contiguous:
                raise TransportUsageError(f"{who}: frames must be C-contiguous")
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            item = OutFrame(view, view.nbytes, "host")
        if item.nbytes > limits.max_frame_bytes:
            raise TransportUsageError(
                f"{who}: frame of {item.nbytes} bytes exceeds {limits.max_frame_bytes}"
            )
        total += item.nbytes
        out.append(item)
    if total > limits.max_message_bytes:
        raise TransportUsageError(
            f"{who}: message of {total} bytes exceeds {limits.max_message_bytes}"
        )
    return out
