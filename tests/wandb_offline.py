"""Read an offline W&B run folder back (its ``run-<id>.wandb`` transaction log) without the network.

The log is W&B's record stream: a 7-byte header (``:W&B``, magic, version), then LevelDB-style chunks
(crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) in blocks of 32 KiB, each chunk a
piece of one serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7
CHUNK = 7


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + CHUNK <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK])
        if kind == 0 and length == 0:
            break
        piece = data[pos + CHUNK : pos + CHUNK + length]
        if len(piece) < length:  # the writer is still appending this chunk
            return
        pos += CHUNK + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def finished_records(path: str | Path, timeout: float = 60.0) -> list:
    """The log's records once it holds the run's ``exit`` record: W&B's writer may still be flushing
    when ``run.finish()`` returns, and a half-written record is not a corrupt one."""
    deadline = time.monotonic() + timeout
    while True:
        recs = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in recs):
            return recs
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout:.0f} s: the run did not finish")
        time.sleep(0.2)


def read_run(run_dir: str | Path) -> dict:
    """``{"name", "group", "tags", "job_type", "summary": {key: value}}`` of one offline run folder."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    out: dict = {"summary": {}}
    for rec in finished_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(name=r.display_name, group=r.run_group, tags=list(r.tags), job_type=r.job_type)
        elif kind == "summary":
            for item in rec.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                out["summary"][key] = json.loads(item.value_json)
            for item in rec.summary.remove:
                out["summary"].pop("/".join(item.nested_key) if item.nested_key else item.key, None)
    return out
