"""The allocation events of the full-depth step, built from the events of two traced depths.

Reserved memory is not linear in depth (segments of 20 MiB fill in steps; a full fine-tune's fragmentation grows
faster than its layers), so it cannot be extrapolated like the live bytes. The events are: a model one layer deeper
makes the same allocations with one layer's worth inserted (its parameters among the others, its forward, its
backward, its entries in every foreach list of the optimizer). `deepen` finds those insertions by diffing the
(kind, nbytes) sequences of depths k and k+1 and inserts them again, once per missing layer, each copy right after
the last: a copy's allocations are freed where the inserted layer's were, and what the inserted layer freed of its
neighbour (a layer's input, the gradient passed down) the copy frees of the copy before it.
"""

from __future__ import annotations

import difflib

from memplan.predict.allocator import ALLOC, FREE

Event = tuple[str, int, int, int]  # (kind, storage id, nbytes, stream), as LiveBytes records them
Source = tuple[int, int, bool]  # a made event's (index in the deeper trace, copy number, inserted)


def deepen(shallow: list[Event], deeper: list[Event], copies: int) -> list[Event] | None:
    """`deeper` (one more layer than `shallow`) with its inserted layer repeated `copies` more times; None when the
    two do not differ by insertions alone, or the insertion's frees do not chain (then nothing is extrapolated)."""
    made = deepen_with_sources(shallow, deeper, copies)
    return made[0] if made is not None else None


def deepen_with_sources(shallow: list[Event], deeper: list[Event],
                        copies: int) -> tuple[list[Event], list[Source]] | None:
    """`deepen`, and for each event made where it comes from: (its index in `deeper`, which copy of the inserted
    layer it is (0: the traced one), whether it is inserted). An allocation's index is the same in `deeper` as
    recorded (only runs of frees are reordered), so the timeline reads its label there."""
    if copies == 0:
        return list(deeper), [(i, 0, False) for i in range(len(deeper))]
    shallow, deeper = _sorted_frees(shallow), _sorted_frees(deeper)
    partner2, partner3 = _partners(shallow), _partners(deeper)
    for seq, partner in ((shallow, partner2), (deeper, partner3)):
        if any(e[0] == FREE and p < 0 for e, p in zip(seq, partner, strict=True)):
            return None  # a free of nothing allocated: not a sequence this can extend
    matcher = difflib.SequenceMatcher(None, [e[:3:2] for e in shallow], [e[:3:2] for e in deeper], autojunk=False)
    to3: dict[int, int] = {}
    inserted = [False] * len(deeper)
    runs: list[tuple[int, int]] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            to3.update(zip(range(i1, i2), range(j1, j2), strict=True))
        elif op == "insert":
            runs.append((j1, j2))
            inserted[j1:j2] = [True] * (j2 - j1)
        else:
            return None
    to2 = {j: i for i, j in to3.items()}
    # succ[x] = y: an inserted allocation x freed outside the insertion is, one layer on, freed by inserted free y
    succ: dict[int, int] = {}
    for x, (kind, *_rest) in enumerate(deeper):
        f3 = partner3[x]
        if kind != ALLOC or f3 < 0 or not inserted[x] or inserted[f3]:
            continue
        a2 = partner2[to2[f3]]
        y = partner3[to3[a2]] if a2 >= 0 and a2 in to3 else -1
        if y >= 0 and inserted[y]:
            succ[x] = y
    pred = {y: x for x, y in succ.items()}
    run_of = {j: r for r, (j1, j2) in enumerate(runs) for j in range(j1, j2)}
    if len(pred) != len(succ) or not _pair_by_size(deeper, run_of, partner3, succ, pred):
        return None
    n = len(deeper)

    def free_key(i: int, copy: int) -> int:  # the id of the allocation event i (a free) releases in `copy`
        a = partner3[i]
        if not inserted[i]:
            return copies * n + a if inserted[a] else a  # the last copy's x is freed where x was
        if inserted[a]:
            return copy * n + a
        return (copy - 1) * n + pred[i] if copy else a

    out: list[Event] = []
    sources: list[Source] = []
    ends = {j2: (j1, j2) for j1, j2 in runs}
    for i, (kind, _key, nbytes, stream) in enumerate(deeper):
        out.append((kind, i if kind == ALLOC else free_key(i, 0), nbytes, stream))
        sources.append((i, 0, inserted[i]))
        if i + 1 in ends:
            j1, j2 = ends[i + 1]
            for copy in range(1, copies + 1):
                out += [(k, copy * n + j if k == ALLOC else free_key(j, copy), b, s)
                        for j, (k, _, b, s) in enumerate(deeper[j1:j2], start=j1)]
                sources += [(j, copy, True) for j in range(j1, j2)]
    return (out, sources) if _well_formed(out) else None


def _well_formed(events: list[Event]) -> bool:
    """Every free releases a live allocation of its size."""
    live: dict[int, int] = {}
    for kind, key, nbytes, _stream in events:
        if kind == ALLOC:
            live[key] = nbytes
        elif live.pop(key, -1) != nbytes:
            return False
    return True


def _pair_by_size(events: list[Event], run_of: dict[int, int], partner: list[int], succ: dict[int, int],
                  pred: dict[int, int]) -> bool:
    """Chain what the diff could not: within a run of frees sorted by size, the free matched to a shallow one may
    release another tensor of that size than the one the layer shift implies. Pair the inserted allocations freed
    outside the insertion with the inserted frees of allocations outside it, size by size, in order, each free in
    the allocation's insertion or a later one where there is one."""
    xs: dict[int, list[int]] = {}
    ys: dict[int, list[int]] = {}
    for i, (kind, _key, nbytes, _stream) in enumerate(events):
        if i not in run_of or partner[i] < 0 or partner[i] in run_of:
            continue
        if kind == ALLOC and i not in succ:
            xs.setdefault(nbytes, []).append(i)
        elif kind == FREE and i not in pred:
            ys.setdefault(nbytes, []).append(i)
    if xs.keys() != ys.keys() or any(len(xs[n]) != len(ys[n]) for n in xs):
        return False
    for n, x_list in xs.items():
        free = list(ys[n])
        for x in x_list:
            y = next((y for y in free if run_of[y] >= run_of[x]), free[0])  # (else `_well_formed` decides)
            free.remove(y)
            succ[x], pred[y] = y, x
    return True


def _partners(events: list[Event]) -> list[int]:
    """For each event the index of its partner: an allocation's free (-1 while never freed), a free's allocation."""
    partner, live = [-1] * len(events), {}
    for i, (kind, key, _nbytes, _stream) in enumerate(events):
        if kind == ALLOC:
            live[key] = i
        elif key in live:
            j = live.pop(key)
            partner[i], partner[j] = j, i
    return partner


def _sorted_frees(events: list[Event]) -> list[Event]:
    """Each run of frees with no allocation between them sorted by size: the garbage collector frees a container's
    tensors in an order that differs between depths, and the allocator's state after the run does not depend on it
    (merging free neighbours is order-free, and peaks are only reached by allocations)."""
    out: list[Event] = []
    run: list[Event] = []
    for e in events:
        if e[0] == FREE:
            run.append(e)
            continue
        out += sorted(run, key=lambda f: f[2])
        run = []
        out.append(e)
    return out + sorted(run, key=lambda f: f[2])
