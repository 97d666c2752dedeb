"""An engine's weights in one arena that can give its device memory back and take it again at the same addresses:
the host-RAM tier of the router (sleep / wake) without reloading, recompiling or re-capturing CUDA graphs.

CUDA: the arena is a virtual address range reserved with the driver's virtual memory API (cuMemAddressReserve),
backed by physical allocations that are mapped (cuMemCreate + cuMemMap) and, on sleep, unmapped and released. The
address range stays reserved, so every tensor view, compiled kernel and captured CUDA graph that points into it stays
valid; wake maps new physical memory at the same addresses and copies the weights back from pinned host memory.
The host copy is made on the first sleep and kept until the engine is unloaded: weights never change, so later
sleeps copy nothing and later wakes are one host-to-device copy.

CPU (tests, and a server without a GPU): the arena is one storage that sleep shrinks to nothing and wake restores
from the host copy; views follow the storage, so the same code path (and its correctness) is exercised.

Only module parameters and buffers move into the arena; small tensors the engine keeps elsewhere (position ids,
the reranker's two head rows, CUDA-graph buffers and pools) stay resident. Their size is what a sleeping engine
still holds, and the router measures it.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

_log = logging.getLogger(__name__)

#: Offsets of tensors in the arena are multiples of this (vectorized kernels want aligned operands).
ALIGNMENT = 256
#: Physical memory is mapped in chunks of this size while the arena is built, so the originals can be freed as
#: their copies land and the peak stays near the weights' size plus one chunk.
BUILD_CHUNK = 256 * 2**20

_PINNED, _DEVICE, _READ_WRITE = 1, 1, 3  # CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_LOCATION_TYPE_DEVICE, PROT_READWRITE


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class _Driver:
    """The few CUDA driver calls of the virtual memory API, through ctypes (no extra package)."""

    def __init__(self, device: int) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.prop = _AllocationProp(type=_PINNED, location=_Location(type=_DEVICE, id=device))
        self.access = _AccessDesc(location=_Location(type=_DEVICE, id=device), flags=_READ_WRITE)
        granularity = ctypes.c_size_t()
        self.check("cuMemGetAllocationGranularity", ctypes.byref(granularity), ctypes.byref(self.prop), 0)
        self.granularity = granularity.value

    def check(self, name: str, *args: object) -> None:
        result = getattr(self.lib, name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            raise RuntimeError(f"{name} failed: CUDA error {result} ({(text.value or b'?').decode()})")

    def round_up(self, size: int) -> int:
        return -(-size // self.granularity) * self.granularity

    def reserve(self, size: int) -> int:
        pointer = ctypes.c_uint64()
        self.check(
            "cuMemAddressReserve", ctypes.byref(pointer), ctypes.c_size_t(size), ctypes.c_size_t(0),
            ctypes.c_uint64(0), ctypes.c_uint64(0),
        )  # fmt: skip
        return pointer.value

    def map(self, address: int, size: int) -> int:
        """Back [address, address + size) with new physical memory; returns its handle."""
        handle = ctypes.c_uint64()
        self.check(
            "cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(self.prop), ctypes.c_uint64(0)
        )
        try:
            self.check(
                "cuMemMap", ctypes.c_uint64(address), ctypes.c_size_t(size), ctypes.c_size_t(0), handle,
                ctypes.c_uint64(0),
            )  # fmt: skip
        except RuntimeError:
            self.check("cuMemRelease", handle)
            raise
        self.check(
            "cuMemSetAccess",
            ctypes.c_uint64(address),
            ctypes.c_size_t(size),
            ctypes.byref(self.access),
            ctypes.c_size_t(1),
        )
        return handle.value

    def unmap(self, address: int, size: int, handle: int) -> None:
        self.check("cuMemUnmap", ctypes.c_uint64(address), ctypes.c_size_t(size))
        self.check("cuMemRelease", ctypes.c_uint64(handle))

    def free_range(self, address: int, size: int) -> None:
        self.check("cuMemAddressFree", ctypes.c_uint64(address), ctypes.c_size_t(size))


class CudaBytes:
    """A byte range the device can address (device memory, or pinned host memory under unified addressing) as
    `__cuda_array_interface__`, so torch wraps it without copying or owning it."""

    def __init__(self, address: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, False), "version": 3}


@dataclass
class _Slot:
    module: nn.Module
    name: str
    is_parameter: bool
    offset: int


def _module_tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                yield module, name, parameter, True
        for name, buffer in module._buffers.items():
            if buffer is not None:
                yield module, name, buffer, False


def _view(arena: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """`like`'s dtype and shape over the arena's bytes at `offset` (contiguous)."""
    size = like.numel() * like.element_size()
    return arena[offset : offset + size].view(like.dtype).view(like.shape)


class WeightArena:
    """The weights of `model`, moved into one arena; `sleep()` frees their device memory, `wake()` restores it."""

    def __init__(self, model: nn.Module, device: torch.device, log: Callable[[str], None] = _log.info) -> None:
        self.device = device
        self.asleep = False
        self._host: torch.Tensor | None = None
        self._handles: list[tuple[int, int, int]] = []  # (address, size, handle) of mapped physical memory
        seen: dict[int, int] = {}  # id(tensor) -> offset: a tensor shared by two modules is stored once
        entries: list[tuple[_Slot, torch.Tensor]] = []
        offset = 0
        for module, name, tensor, is_parameter in _module_tensors(model):
            if id(tensor) in seen:
                entries.append((_Slot(module, name, is_parameter, seen[id(tensor)]), tensor))
                continue
            seen[id(tensor)] = offset
            entries.append((_Slot(module, name, is_parameter, offset), tensor))
            offset += -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT
        self.nbytes = offset
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self._driver: _Driver | None = _Driver(device.index or 0)
            self._size = self._driver.round_up(max(offset, 1))
            self._address = self._driver.reserve(self._size)
            first = min(self._driver.round_up(BUILD_CHUNK), self._size)  # torch checks the pointer is mapped
            self._handles.append((self._address, first, self._driver.map(self._address, first)))
            self.arena = torch.as_tensor(CudaBytes(self._address, self._size), device=device)
        else:
            self._driver = None
            self.arena = torch.empty(max(offset, 1), dtype=torch.uint8, device=device)
        self._fill(entries)
        log(f"weights in one arena: {self.nbytes / 2**20:.0f} MiB in {time.perf_counter() - started:.1f} s")

    def _fill(self, entries: list[tuple[_Slot, torch.Tensor]]) -> None:
        """Copy each tensor into the arena and point its module at the copy, freeing originals as chunks fill.

        Consumes `entries`: a list that kept every original alive until the build ended would hold the weights twice
        (an 8B FP8 encoder's load peaked at 15.2 GB for 7.05 GB of weights, BENCHMARKS.md), and those freed only
        after the last release would stay cached in torch's allocator."""
        mapped = sum(size for _, size, _ in self._handles)
        placed: set[int] = set()
        since_release = 0
        pending = deque(entries)
        entries.clear()
        while pending:
            slot, tensor = pending.popleft()
            size = tensor.numel() * tensor.element_size()
            if self._driver is not None:
                while mapped < min(slot.offset + size, self._size):
                    chunk = min(self._driver.round_up(BUILD_CHUNK), self._size - mapped)
                    self._handles.append(
                        (self._address + mapped, chunk, self._driver.map(self._address + mapped, chunk))
                    )
                    mapped += chunk
            view = _view(self.arena, slot.offset, tensor)
            if slot.offset not in placed:
                view.copy_(tensor.detach().contiguous())
                placed.add(slot.offset)
                since_release += size
            if slot.is_parameter:
                slot.module._parameters[slot.name] = nn.Parameter(view, requires_grad=False)
            else:
                slot.module._buffers[slot.name] = view
            del tensor  # the module points at the copy now: the original's last reference (unless shared)
            if self._driver is not None and since_release >= BUILD_CHUNK:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                since_release = 0
        if self._driver is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @property
    def host_bytes(self) -> int:
        """Host RAM the arena's copy holds (0 until the first sleep)."""
        return 0 if self._host is None else self._host.numel()

    def sleep(self) -> float:
        """Give the weights' device memory back (keeping their addresses); returns the seconds it took."""
        if self.asleep:
            return 0.0
        started = time.perf_counter()
        if self._host is None:
            self._host = torch.empty(self.arena.numel(), dtype=torch.uint8, pin_memory=self._driver is not None)
            self._host.copy_(self.arena, non_blocking=False)
        if self._driver is not None:
            torch.cuda.synchronize(self.device)
            for address, size, handle in self._handles:
                self._driver.unmap(address, size, handle)
            self._handles = []
            torch.cuda.empty_cache()  # activations the allocator cached for the largest batch seen
        else:
            self.arena.untyped_storage().resize_(0)
        self.asleep = True
        return time.perf_counter() - started

    def wake(self) -> float:
        """Memory back at the same addresses, weights copied back from the host; returns the seconds it took."""
        if not self.asleep:
            return 0.0
        assert self._host is not None
        started = time.perf_counter()
        if self._driver is not None:
            self._handles = [(self._address, self._size, self._driver.map(self._address, self._size))]
            self.arena.copy_(self._host, non_blocking=True)
            torch.cuda.synchronize(self.device)
        else:
            self.arena.untyped_storage().resize_(self._host.numel())
            self.arena.copy_(self._host)
        self.asleep = False
        return time.perf_counter() - started

    def close(self) -> None:
        """Release the physical memory and the address range (the engine is being unloaded)."""
        if self._driver is not None:
            torch.cuda.synchronize(self.device)
            for address, size, handle in self._handles:
                self._driver.unmap(address, size, handle)
            self._handles = []
            self._driver.free_range(self._address, self._size)
            self._driver = None
        self._host = None
