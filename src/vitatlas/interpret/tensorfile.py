"""Write a safetensors file tensor by tensor, without a second in-memory copy of the data.

``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` object, which doubles the
peak memory for the largest thing the interpret pass holds (the (A, N, P) patch codes: 256 MiB for
16,384 atoms × 16 images × 256 patches, both signs). The format is simple — an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range (plus optional string
metadata), then the raw little-endian data — so it is written here directly from each tensor's
buffer. Readers are the ordinary ones (``safetensors.torch.load_file``, ``safe_open``). The file is
written under a temporary name, fsynced and renamed into place, like every vitatlas file.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import torch

from ..io import atomic_writer

DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU or not; contiguous copies are made one tensor at a time) atomically."""
    if sys.byteorder != "little":  # the format is little-endian; numpy views would not be
        from ..io import atomic_save_safetensors

        atomic_save_safetensors(path, tensors, metadata)
        return
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad the header to 8 bytes, as the reference writer does
    with atomic_writer(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(np.ascontiguousarray(t.view(torch.uint8).numpy() if t.dtype == torch.bool
                                                        else t.numpy())).cast("B"))
