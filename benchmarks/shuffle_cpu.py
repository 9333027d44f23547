"""CPU time of the out-of-band shuffle's pure data path, per stage, in one process.

No Ray, no transport: the functions a transfer task and a shuffle actor run on the
bytes, measured with ``time.process_time`` (CPU seconds of this process, all its
threads), which a shared machine distorts far less than wall time. Stages:

- ``split``: ``sort_by_partition`` of one input partition (sort by the partition
  column, one gather);
- ``encode``: ``encode_slices`` of every piece (an Arrow record batch each, sharing
  one schema: the one copy); ``split + encode`` is what ``split_for_sending`` costs a
  transfer task;
- ``decode``: ``pieces_to_tables`` of the pieces one output partition receives, one
  per input partition (with the receiver's validation);
- ``concat``: ``concat_partition`` of those tables into the output frame, as the
  actor's ``get_output_partition`` does;
- ``store``: ``DiskShardStore`` append and read of those pieces, in memory.

The data mirror ``benchmarks/shuffle_bench.py`` (int64 key, two float64, one int64,
dask's ``partitioning_index`` of the key as ``_partitions``, a RangeIndex); ``--strings``
adds a string column of 8-24 characters. Prints one JSON line per stage: median CPU ms
per call and CPU seconds per GiB of input, then one line with the totals.

    python benchmarks/shuffle_cpu.py --partition-mb 16 --out 64 --repeat 7
    python benchmarks/shuffle_cpu.py --partition-mb 1 --out 256 --repeat 7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dask.dataframe.shuffle import partitioning_index
from timing import measure

from shuffle._ids import ShardKey
from shuffle._partition import concat_partition, sort_by_partition
from shuffle._store import DiskShardStore
from shuffle.wire._arrow import encode_slices, pieces_to_tables

BYTES_PER_ROW = 32  # the four numeric columns, as in shuffle_bench.py


def make_input(i: int, rows: int, nout: int, *, strings: bool, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, i])
    df = pd.DataFrame(
        {
            "k": rng.integers(0, 64 * rows, rows, dtype=np.int64),
            "a": rng.random(rows),
            "b": rng.standard_normal(rows),
            "c": rng.integers(0, 1000, rows, dtype=np.int64),
        },
        index=pd.RangeIndex(i * rows, (i + 1) * rows),
    )
    if strings:
        lengths = rng.integers(8, 25, rows)
        alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype="S1")
        chars = alphabet[rng.integers(0, 26, int(lengths.sum()))].tobytes().decode()
        ends = np.cumsum(lengths)
        df["s"] = pd.array(
            [chars[e - n : e] for e, n in zip(ends, lengths, strict=True)], dtype="str"
        )
    # what dask's p2p graphs add before the transfer (AssignPartitioningIndex)
    df["_partitions"] = partitioning_index(df["k"], nout)
    return df


def cpu_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median CPU milliseconds of ``fn()`` over ``repeat`` calls, after one warm-up."""
    median, result, _ = measure(fn, repeat=repeat, warmup=1, clock=time.process_time)
    return median * 1e3, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partition-mb", type=float, default=16, help="MiB per input partition")
    p.add_argument("--out", type=int, default=64, help="output partitions (M)")
    p.add_argument("--inputs", type=int, default=None, help="input partitions (N; default M)")
    p.add_argument("--strings", action="store_true", help="add a string column")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    nin = args.inputs or args.out
    rows = max(1, int(args.partition_mb * 2**20) // BYTES_PER_ROW)
    gib = rows * BYTES_PER_ROW / 2**30  # numeric input bytes of one partition, in GiB

    first = make_input(0, rows, args.out, strings=args.strings, seed=args.seed)
    meta = first.iloc[:0].drop(columns="_partitions")
    # The pieces of output partition 0 from every input, as its owner receives them.
    received = []  # (meta, payload)
    for i in range(nin):
        df = make_input(i, rows, args.out, strings=args.strings, seed=args.seed) if i else first
        slices = sort_by_partition(df, column="_partitions", npartitions=args.out)
        piece = encode_slices(*slices).get(0)
        if piece is not None:
            received.append((getattr(piece, "meta", b""), getattr(piece, "data", piece)))
    in_rows = sum(t.num_rows for t in pieces_to_tables(received))

    def store() -> list[Any]:
        with DiskShardStore(memory_limit=None) as s:
            for i, (_, buf) in enumerate(received):
                s.append(ShardKey(0, i), buf)
            return s.read(0)

    split_ms, (table, bounds) = cpu_ms(
        lambda: sort_by_partition(first, column="_partitions", npartitions=args.out),
        args.repeat,
    )
    encode_ms, _ = cpu_ms(lambda: encode_slices(table, bounds), args.repeat)
    decode_ms, decoded = cpu_ms(lambda: pieces_to_tables(received), args.repeat)
    concat_ms, out = cpu_ms(lambda: concat_partition(decoded, meta=meta), args.repeat)
    store_ms, _ = cpu_ms(store, args.repeat)
    assert len(out) == in_rows, (len(out), in_rows)

    common = {
        "partition_mb": args.partition_mb,
        "inputs": nin,
        "out": args.out,
        "strings": args.strings,
        "rows_per_input": rows,
        "repeat": args.repeat,
    }
    # Per GiB of shuffled input: N senders' share is 1/N each, an output's rows are
    # ~1/M of all; scale each stage by how many calls one GiB takes.
    out_gib = in_rows * BYTES_PER_ROW / 2**30
    per_gib = {
        "split": split_ms / gib,
        "encode": encode_ms / gib,
        "decode": decode_ms / out_gib,
        "concat": concat_ms / out_gib,
        "store": store_ms / out_gib,
    }
    for stage, ms in (
        ("split", split_ms),
        ("encode", encode_ms),
        ("decode", decode_ms),
        ("concat", concat_ms),
        ("store", store_ms),
    ):
        pieces = len(bounds) if stage in ("split", "encode") else len(received)
        print(
            json.dumps(
                {
                    "stage": stage,
                    "cpu_ms": round(ms, 3),
                    "pieces": pieces,
                    "cpu_s_per_gib": round(per_gib[stage] / 1e3, 3),
                    **common,
                }
            ),
            flush=True,
        )
    sender = per_gib["split"] + per_gib["encode"]
    receiver = per_gib["decode"] + per_gib["concat"] + per_gib["store"]
    print(
        json.dumps(
            {
                "total": True,
                "sender_cpu_s_per_gib": round(sender / 1e3, 3),
                "receiver_cpu_s_per_gib": round(receiver / 1e3, 3),
                "cpu_s_per_gib": round((sender + receiver) / 1e3, 3),
                **common,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
