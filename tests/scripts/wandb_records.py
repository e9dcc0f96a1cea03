"""Read a Weights & Biases offline run file (``wandb/offline-run-*/run-*.wandb``) back, as wandb
itself would replay it for ``wandb sync``: the file is a LevelDB-style log (a 7-byte header
``:W&B`` + magic + version, then 32 KiB blocks of records, each with a 7-byte header: CRC32, length
(2 bytes, little endian), type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) whose payloads are wandb's
``Record`` protobufs. Only the tests use this (wandb 0.31 no longer ships a reader)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List

BLOCK = 32 * 1024
FILE_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path) -> List[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    out, partial, pos = [], b"", FILE_HEADER
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # the rest of a block too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE:
            partial += chunk
        elif kind == LAST:
            out.append(partial + chunk)
            partial = b""
    return out


def read_run(path: Path) -> Dict[str, object]:
    """``{"history": [{key: value, ...} per logged step], "config": {...}}`` of one run file."""
    from wandb.proto import wandb_internal_pb2 as pb
    history, config = [], {}
    for raw in payloads(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("config", "run"):  # the run record carries the config given to wandb.init
            for item in (rec.config if kind == "config" else rec.run.config).update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config}
