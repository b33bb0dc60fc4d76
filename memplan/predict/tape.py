"""A tiny symbolic autograd tape: which tensors does one decoder layer save for backward?

Each op below mirrors what the real torch op saves (its `derivatives.yaml` entry) for the code transformers 5.x
runs; a storage saved by several ops counts once, and a saved view pins its whole base storage.
Pure Python on integers: one layer takes microseconds.
Rule of thumb for products: `mul(a, b)` saves `b` iff `a` requires grad and `a` iff `b` does; `linear(x, W)` saves
`x` iff W trains (parameters themselves are counted as weights, never here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import count

_ids = count()
MADE, DROPPED, CAST = "made", "dropped", "cast"  # a recorded program's events (Lifetimes)


class Lifetimes:
    """The storages a program makes and drops, in order: CPython frees a T as its last reference goes (refcounts),
    as torch frees a storage when its last tensor goes, so a program written as transformers' code is (locals,
    temporaries inside an expression) drops its tensors where that code does. Views share their base's count;
    storages made before the recording (the layer's input, parameters) are not counted."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []  # (MADE | DROPPED | CAST, storage or 0, bytes or numel)
        self.refs: dict[int, int] = {}
        self.open = True

    def made(self, t: T, fresh: bool) -> None:
        if t.param or not self.open:
            return
        if fresh and t.storage_bytes:
            self.refs[t.storage] = 1
            self.events.append((MADE, t.storage, t.storage_bytes))
        elif t.storage in self.refs:
            self.refs[t.storage] += 1

    def dropped(self, t: T) -> None:
        if not self.open or t.storage not in self.refs:
            return
        self.refs[t.storage] -= 1
        if not self.refs[t.storage]:
            del self.refs[t.storage]
            self.events.append((DROPPED, t.storage, t.storage_bytes))


_recording: ContextVar[Lifetimes | None] = ContextVar("memplan_tape_recording", default=None)


@dataclass(slots=True)
class T:
    """A symbolic tensor: element count, bytes per element, requires-grad; views share `storage`."""

    numel: int
    width: int
    rg: bool
    param: bool = False
    storage: int = field(default_factory=lambda: next(_ids))
    storage_bytes: int = -1
    _lifetimes: Lifetimes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fresh = self.storage_bytes < 0  # only a view passes its base's storage
        if fresh:
            self.storage_bytes = self.numel * self.width
        rec = _recording.get()
        if rec is not None:
            self._lifetimes = rec
            rec.made(self, fresh)

    def __del__(self) -> None:
        if self._lifetimes is not None:
            self._lifetimes.dropped(self)

    @property
    def nbytes(self) -> int:
        return self.numel * self.width

    def view(self, numel: int, rg: bool | None = None) -> T:
        """A slice/transpose/reshape without copy: same storage."""
        return T(numel, self.width, self.rg if rg is None else rg, self.param, self.storage, self.storage_bytes)


def param(numel: int, width: int, trains: bool) -> T:
    return T(numel, width, trains, param=True)


@dataclass(slots=True)
class Tape:
    """Collects saved storages (id -> bytes) while a layer program runs."""

    saved: dict[int, int] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)  # the saved storages a custom autograd Function keeps as a
    # plain ctx attribute (bitsandbytes' `ctx.tensors`): autograd releases only save_for_backward's tensors after a
    # node ran (PyNode::release_variables), so these live until the graph itself is freed
    lifetimes: Lifetimes | None = None  # set inside `recording()`
    mark: int = -1  # len(saved) when `mark_here` ran: storages first saved from then on come after it in `saved`

    @contextlib.contextmanager
    def recording(self) -> Iterator[Lifetimes]:
        """Record the storages the program run inside makes and drops (Lifetimes), and where a trained weight is
        read by a linear (CAST: its numel)."""
        self.lifetimes = Lifetimes()
        token = _recording.set(self.lifetimes)
        try:
            yield self.lifetimes
        finally:
            _recording.reset(token)
            self.lifetimes.open = False

    def mark_here(self) -> None:
        self.mark = len(self.saved)

    @property
    def nbytes_before_mark(self) -> int:
        """Bytes of the storages first saved before the mark (all of them without one)."""
        if self.mark < 0:
            return self.nbytes
        return sum(list(self.saved.values())[:self.mark])

    @property
    def held_after_mark(self) -> int:
        """Bytes of the held storages first saved after the mark: still alive once their nodes ran."""
        if self.mark < 0:
            return 0
        return sum(self.held.get(k, 0) for k in list(self.saved)[self.mark:])

    def save(self, *tensors: T) -> None:
        for t in tensors:
            if not t.param:
                self.saved[t.storage] = t.storage_bytes

    def hold(self, *tensors: T) -> None:
        """Saved through a ctx attribute, not save_for_backward: alive until the graph is freed (see `held`)."""
        self.save(*tensors)
        for t in tensors:
            if not t.param:
                self.held[t.storage] = t.storage_bytes

    @property
    def nbytes(self) -> int:
        return sum(self.saved.values())

    # ---- ops ----------------------------------------------------------------------------------------------
    @staticmethod
    def new(like: T, *, numel: int | None = None, width: int | None = None, rg: bool | None = None) -> T:
        return T(like.numel if numel is None else numel, like.width if width is None else width,
                 like.rg if rg is None else rg)

    def cast(self, x: T, width: int) -> T:
        """x.to(dtype): a new tensor unless the dtype already matches; saves nothing."""
        return x if x.width == width else self.new(x, width=width)

    def mul(self, a: T, b: T, width: int | None = None) -> T:
        if a.rg:
            self.save(b)
        if b.rg:
            self.save(a)
        return T(max(a.numel, b.numel), width or max(a.width, b.width), a.rg or b.rg)

    def saving_input(self, x: T, width: int | None = None) -> T:
        """silu, gelu, pow: backward needs the input."""
        if x.rg:
            self.save(x)
        return self.new(x, width=width)

    def saving_output(self, x: T, width: int | None = None, numel: int | None = None) -> T:
        """tanh, rsqrt, softmax, log_softmax: backward needs the result."""
        out = self.new(x, width=width, numel=numel)
        if x.rg:
            self.save(out)
        return out

    def linear(self, x: T, in_features: int, out_features: int, *, w_trains: bool, width: int,
               autocast: bool = True) -> T:
        """F.linear: saves x if the weight trains (x already in the compute dtype). `autocast`: the op has an
        autocast rule, so a trained weight is read through autocast's copy (CAST; grouped_mm has none)."""
        if w_trains:
            if autocast and self.lifetimes is not None and self.lifetimes.open:
                self.lifetimes.events.append((CAST, 0, in_features * out_features))
            self.save(x)
        return T(x.numel // in_features * out_features, width, x.rg or w_trains)
