"""A safetensors checkpoint read straight into device memory, fast: the cold-load step that copies the weights.

`model.to("cuda")` from a memory-mapped checkpoint copies from pageable memory (~6-8 GB/s: 2-3 s for an 8B model in
bfloat16). Here the file is read by several threads at once (`os.preadv`, which releases the GIL) into a few pinned
buffers in turn, and each goes to the device with an asynchronous copy while the next ones fill: the disk or page
cache and the copy engine work at the same time, and no pageable copy is made (8B bf16 on the H200 host: ~1 s).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range in the data section, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

#: One staging buffer: large enough that each copy runs at full bandwidth.
STAGING_BYTES = 128 * 2**20
#: Staging buffers used in turn (pinned memory costs ~0.5 s a GiB to allocate, so a few small ones). Two: one
#: buffer's reads in flight while the other is copied. Four 64 MiB buffers (three in flight) measured slower on the
#: H200 host while the compiler imports in the background (checkpoint 1.8-2.5 s against 1.6-1.7 s, BENCHMARKS.md).
BUFFERS = 2
#: Each thread reads this much of a buffer at a time (every read hands the GIL back and forth: fewer, larger reads
#: wait less for it while another thread imports).
READ_PIECE = 16 * 2**20
#: Threads reading at once: page-cache copies run at a few GB/s each (8 gave 13-16 GiB/s on the H200 host).
READ_THREADS = 16
#: A gap between two wanted tensors up to this size is read through rather than starting a new buffer.
MAX_GAP = 2**20

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies: its file and the absolute byte range of its data in it."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the sharded index's, or the single `model.safetensors`."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors (or its sharded index) in {model_dir}")
    return [single]


def read_header(file: Path) -> list[StoredTensor]:
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 2**20:
            raise ValueError(f"{file} is not a safetensors file (header length {length})")
        header = json.loads(handle.read(length))
    data_start = 8 + length
    size = file.stat().st_size
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {entry['dtype']}, which this reader does not know")
        begin, end = (data_start + offset for offset in entry["data_offsets"])
        if end > size:
            raise ValueError(f"{file} is truncated: {name} ends at byte {end} of {size}")
        tensors.append(StoredTensor(name, file, _DTYPES[entry["dtype"]], tuple(entry["shape"]), begin, end))
    return tensors


def stored_tensors(model_dir: Path) -> list[StoredTensor]:
    """Every tensor of the checkpoint, in file order."""
    return [tensor for file in checkpoint_files(model_dir) for tensor in sorted(read_header(file), key=_begin)]


def read_rows(stored: StoredTensor, rows: Sequence[int]) -> torch.Tensor:
    """Some rows of a stored tensor, read alone (the reranker's two rows of a 150,000-row LM head)."""
    row_bytes = stored.nbytes // stored.shape[0]
    data = bytearray()
    with stored.file.open("rb") as handle:
        for row in rows:
            if not 0 <= row < stored.shape[0]:
                raise ValueError(f"{stored.name} has {stored.shape[0]} rows, not a row {row}")
            handle.seek(stored.begin + row * row_bytes)
            chunk = handle.read(row_bytes)
            if len(chunk) != row_bytes:
                raise ValueError(f"{stored.file} ended early in {stored.name}")
            data += chunk
    return torch.frombuffer(data, dtype=stored.dtype).reshape(len(rows), *stored.shape[1:]).clone()


def _begin(tensor: StoredTensor) -> int:
    return tensor.begin


def _windows(tensors: list[StoredTensor], size: int) -> Iterator[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """(file offset, bytes, pieces) of each buffer's worth of reading; a piece is (tensor index, offset in the
    tensor, offset in the buffer, bytes). Tensors in file order; a tensor larger than a buffer spans several."""
    index, done = 0, 0
    while index < len(tensors):
        start = tensors[index].begin + done
        filled, pieces = 0, []
        while index < len(tensors) and filled < size:
            tensor = tensors[index]
            gap = tensor.begin + done - (start + filled)
            if gap < 0 or gap > MAX_GAP or filled + gap >= size:  # overlapping, far, or no room: next buffer
                break
            filled += gap
            take = min(tensor.nbytes - done, size - filled)
            pieces.append((index, done, filled, take))
            filled, done = filled + take, done + take
            if done == tensor.nbytes:
                index, done = index + 1, 0
        yield start, filled, pieces


def _read_exactly(descriptor: int, view: memoryview, offset: int, file: Path) -> None:
    while len(view):
        count = os.preadv(descriptor, [view], offset)
        if count == 0:
            raise ValueError(f"{file} ended early at byte {offset}")
        view, offset = view[count:], offset + count


def load_tensors(
    tensors: list[StoredTensor],
    device: torch.device,
    receive: Callable[[StoredTensor, torch.Tensor], None],
    staging_bytes: int = STAGING_BYTES,
) -> int:
    """Read `tensors` onto `device`, handing each to `receive` as soon as its copy is queued (work `receive` queues on
    the current stream runs after the copy). Each tensor is a new allocation in its stored dtype and shape, made at
    its first byte, so peak memory stays low. Returns the bytes read.

    A pipeline: the reads of `BUFFERS - 1` buffers are in flight while the oldest is copied."""
    pinned = device.type == "cuda"
    buffers = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(BUFFERS)]
    views = [buffer.numpy().data for buffer in buffers]
    events = [torch.cuda.Event() if pinned else None for _ in buffers]
    files = list(dict.fromkeys(tensor.file for tensor in tensors))
    descriptors = {file: os.open(file, os.O_RDONLY) for file in files}
    targets: dict[tuple[Path, int], torch.Tensor] = {}
    in_flight: deque[tuple[list[StoredTensor], int, int, list[tuple[int, int, int, int]], list[Future[None]]]] = deque()
    total = 0

    def copy_oldest() -> None:
        in_file, which, length, pieces, reads = in_flight.popleft()
        for read in reads:
            read.result()
        for index, offset, at, count in pieces:
            stored = in_file[index]
            key = (stored.file, index)
            if key not in targets:
                targets[key] = torch.empty(stored.shape, dtype=stored.dtype, device=device)
            if count:
                destination = targets[key].view(-1).view(torch.uint8)[offset : offset + count]
                destination.copy_(buffers[which][at : at + count], non_blocking=pinned)
        if (event := events[which]) is not None:
            event.record()
        for index, offset, _, count in pieces:
            if offset + count == in_file[index].nbytes:
                receive(in_file[index], targets.pop((in_file[index].file, index)))

    try:
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, os.cpu_count() or 1)) as pool:
            turn = 0
            for file in files:
                in_file = sorted((t for t in tensors if t.file == file), key=_begin)
                for start, length, pieces in _windows(in_file, staging_bytes):
                    while len(in_flight) >= BUFFERS - 1:
                        copy_oldest()
                    which = turn % BUFFERS
                    turn += 1
                    if (event := events[which]) is not None:
                        event.synchronize()  # this buffer's previous copy is done: it may be overwritten
                    reads = [
                        pool.submit(
                            _read_exactly,
                            descriptors[file],
                            views[which][at : min(at + READ_PIECE, length)],
                            start + at,
                            file,
                        )
                        for at in range(0, length, READ_PIECE)
                    ]
                    in_flight.append((in_file, which, length, pieces, reads))
                    total += length
            while in_flight:
                copy_oldest()
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)
    if pinned:
        torch.cuda.synchronize(device)
    return total


def read_lm_head_rows(model_dir: Path, token_ids: list[int]) -> torch.Tensor | None:
    """The given rows of `lm_head.weight` from the checkpoint, or None when the head is tied to the embeddings."""
    head = next((stored for stored in stored_tensors(model_dir) if stored.name == "lm_head.weight"), None)
    return None if head is None else read_rows(head, token_ids)
