"""Live tensor bytes, counted at the dispatcher: every op's outputs add their storage's bytes once; a storage's
finalizer subtracts them. Works on real CPU tensors and on fake tensors alike.

With `record_events` it keeps the ordered (kind, storage, nbytes, stream) events for a replay through the caching-
allocator model (memplan.predict.allocator.replay): one tuple appended per allocation and per free.

With `capacity_bytes` it also simulates a device of that size: an allocation that would push live bytes past it
raises SimulatedOOM, which the probe reports exactly as a CUDA OOM (this is what makes OOM paths testable on CPU).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from memplan.predict.allocator import ALLOC, FREE

OOM_MESSAGE = "memplan: simulated out of memory"
_DEVICE = torch.ops.prim.device.default


class SimulatedOOM(torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else RuntimeError):  # type: ignore[misc]
    """Raised when live bytes would exceed the simulated capacity (a subclass of torch.OutOfMemoryError)."""


class LiveBytes(TorchDispatchMode):
    """Running and peak live bytes of all storages created inside the mode (plus those seeded)."""

    def __init__(self, capacity_bytes: int | None = None, by_owner: bool = False,
                 record_events: bool = False) -> None:
        super().__init__()
        self.events: list[tuple[str, int, int, int]] | None = [] if record_events else None
        self.capacity_bytes = capacity_bytes
        self.by_owner = by_owner  # attribute bytes to `owner` (a module path or a phase) and keep them at the peak
        self.owner = ""
        self._live_by_owner: dict[str, int] = {}
        self.peak_by_owner: dict[str, int] = {}
        self.live = 0
        self.peak = 0
        self.phase = ""  # set by the caller around forward / backward / optimizer
        self.peak_phase = ""
        self.phase_peaks: dict[str, int] = {}  # the peak inside each phase
        self._nbytes: dict[int, int] = {}  # live storages (by StorageImpl) -> their current size
        self._owner: dict[int, str] = {}

    def reset_peak(self) -> None:
        """Start the peak over from what is live now (after FSDP sharding: the full model never was on the GPU)."""
        self.peak, self.peak_phase, self.phase_peaks = self.live, self.phase, {}
        if self.by_owner:
            self.peak_by_owner = dict(self._live_by_owner)
        if self.events is not None:  # the replay starts over too, from the storages live now
            self.events = [(ALLOC, key, n, 0) for key, n in self._nbytes.items()]

    def seed(self, tensors: Any) -> None:
        """Count tensors that exist before the mode starts (parameters, buffers, inputs)."""
        for t in tensors:
            self._add(t, check=False)

    def _add(self, t: torch.Tensor, check: bool = True) -> None:
        if is_traceable_wrapper_subclass(t):  # DTensor & co: the wrapper's storage is a placeholder of the
            for name in t.__tensor_flatten__()[0]:  # global size; the memory is in the inner (local) tensors
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._add(inner, check)
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._nbytes:
            return
        owner = (self.owner or self.phase or "parameters") if self.by_owner else ""
        self._grow(storage.nbytes(), owner, check)
        self._nbytes[key], self._owner[key] = storage.nbytes(), owner
        if self.events is not None:
            self.events.append((ALLOC, key, storage.nbytes(), 0))
        weakref.finalize(storage, self._free, key)

    def _grow(self, nbytes: int, owner: str, check: bool = True) -> None:
        if check and nbytes > 0 and self.capacity_bytes is not None and self.live + nbytes > self.capacity_bytes:
            raise SimulatedOOM(f"{OOM_MESSAGE}: tried to allocate {nbytes} bytes with {self.live} live "
                               f"of {self.capacity_bytes} capacity")
        self.live += nbytes
        if self.by_owner:
            self._live_by_owner[owner] = self._live_by_owner.get(owner, 0) + nbytes
        if self.live > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.live
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase
            if self.by_owner:
                self.peak_by_owner = dict(self._live_by_owner)

    def _free(self, key: int) -> None:
        nbytes, owner = self._nbytes.pop(key, 0), self._owner.pop(key, "")
        if self.events is not None and nbytes:
            self.events.append((FREE, key, nbytes, 0))
        self.live -= nbytes
        if self.by_owner:
            self._live_by_owner[owner] = self._live_by_owner.get(owner, 0) - nbytes

    def _resized(self, storage: Any, size: int) -> None:
        """FSDP frees and re-allocates gathered parameters by resizing their storage (`resize_(0)` / back)."""
        key = storage._cdata
        if key in self._nbytes:
            owner, old = self._owner[key], self._nbytes[key]
            delta = int(size) - old
            if delta > 0:
                self._grow(delta, owner)
            else:
                self.live += delta
                if self.by_owner:
                    self._live_by_owner[owner] = self._live_by_owner.get(owner, 0) + delta
            self._nbytes[key] = int(size)
            if self.events is not None:  # FSDP's resize_(0) / resize_(n): the old block freed, one of the new size
                self.events += ((FREE, key, old, 0), (ALLOC, key, int(size), 0))

    def __enter__(self) -> LiveBytes:
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: Any, size: int) -> Any:
            if size > storage.nbytes():  # check the capacity before growing
                tracker._resized(storage, size)
                return original(storage, size)
            out = original(storage, size)
            tracker._resized(storage, size)
            return out

        self._restore = original
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._restore  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is _DEVICE:  # C++ asks a fake tensor's device ~1,400 times per traced layer: allocates nothing
            return func(*args)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)
        return out
