"""The one check of a checkpoint's weight files, made before anything reads them.

Every opener of a checkpoint (``tformer.load`` and so ``evaluate``, ``generate``, ``serve``,
``export``, ``attention``; ``average``; ``train --resume``) calls :func:`check_weights`, so a
truncated copy or a damaged header is a :class:`CheckpointError` naming the file, never a raw
``SafetensorError`` from deep inside a loader. Damage that keeps the file's size and header
intact (flipped bytes in the tensor data) is caught by the sha256 checksums that
``tformer.training.checkpoint`` records beside a training checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

#: Bytes per element of the safetensors dtypes.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or damaged; the message names the path."""


def check_safetensors(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """Check that ``path`` is a complete safetensors file: a readable header whose tensors
    exactly cover the rest of the file. Returns {tensor name: (dtype, shape)}; raises
    CheckpointError naming the file and what is wrong. Reads the header only (not the data)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is damaged: {size} bytes, too short for a "
                                      "safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path} is damaged: its header declares {n} bytes, the "
                                      f"file has {size} (truncated or overwritten)")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged: its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is damaged: its header is not a JSON object")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            width = _DTYPE_BYTES.get(dtype)  # a newer dtype: its size goes unchecked
            expected = stop - begin if width is None else math.prod(shape) * width
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is damaged: header entry {name!r} is malformed") from None
        if not 0 <= begin <= stop or stop - begin != expected:
            raise CheckpointError(f"{path} is damaged: tensor {name!r} ({dtype} {shape}) has "
                                  f"offsets {begin}..{stop}, expected {expected} bytes")
        tensors[name] = (dtype, list(shape))
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is damaged: its tensors need {8 + n + end} bytes, the "
                              f"file has {size} (truncated or extended)")
    return tensors


def check_weights(directory: str | Path) -> None:
    """Check every ``*.safetensors`` file of a model directory (its LoRA ``adapter/`` too), and
    the files a sharded checkpoint's index names; CheckpointError naming the first bad one.
    A directory without safetensors files (an old ``pytorch_model.bin``) passes: its loader
    reads it with ``torch.load(weights_only=True)``."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*/*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index} is damaged ({error})") from None
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise CheckpointError(f"{directory} is incomplete: {index.name} names {missing}, "
                                  "which are missing")
    for path in files:
        check_safetensors(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's sha256, read in 1 MiB chunks (bounded memory for any size)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
