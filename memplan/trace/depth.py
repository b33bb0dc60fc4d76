"""Peak memory is linear in the number of decoder layers: extrapolate traces of k, k+1 (checked at k+2) layers to
the real depth, each phase's peak on its own line. Reserved memory is not linear (see `_reserved`): it is the replay
of the full depth's allocation events, built from the two deepest traces (trace/deepen.py)."""

from __future__ import annotations

import dataclasses

from memplan.predict.allocator import replay
from memplan.trace.deepen import deepen
from memplan.trace.step import Trace

LINEARITY_TOLERANCE = 1e-3  # relative gap of the third point from the line of the first two


def extrapolate(traces: list[Trace], layers: int) -> Trace | None:
    """Each quantity, and the peak of each phase separately, on the line through the first two depths (checked
    against the third). The peak is the largest extrapolated phase peak: which phase wins can change with depth
    (the optimizer step grows faster per layer than a LoRA backward, say), so the overall peak is not linear."""
    if traces[-1].layers == layers:
        return traces[-1]
    if len(traces) < 2:
        return None
    a, b = traces[0], traces[1]

    step = b.layers - a.layers  # 1, or a period of mixed layer types (ModelSpec.layer_period)

    def line(x: int, y: int, n: int) -> int:
        return x + (y - x) * (n - a.layers) // step

    fields = ("weights", "states", "forward_end", "trainable", "params")
    if len(traces) == 3:
        c = traces[2]
        pairs = [(getattr(a, f), getattr(b, f), getattr(c, f)) for f in fields]
        pairs += [(a.phase_peaks.get(p, 0), b.phase_peaks.get(p, 0), c.phase_peaks.get(p, 0)) for p in b.phase_peaks]
        for x, y, z in pairs:
            if abs(z - line(x, y, c.layers)) > LINEARITY_TOLERANCE * max(z, 1):
                return None
    peaks = {p: line(a.phase_peaks.get(p, 0), v, layers) for p, v in b.phase_peaks.items()}
    phase = max(peaks, key=peaks.__getitem__)
    full = Trace(layers=layers, peak=peaks[phase], weights=line(a.weights, b.weights, layers),
                 states=line(a.states, b.states, layers), forward_end=line(a.forward_end, b.forward_end, layers),
                 trainable=line(a.trainable, b.trainable, layers), params=line(a.params, b.params, layers),
                 phase=phase, phase_peaks=peaks,
                 by_module={k: line(a.by_module.get(k, 0), v, layers) for k, v in b.by_module.items()},
                 peak_reserved=line(a.peak_reserved, b.peak_reserved, layers),
                 reserved_allocated=line(a.reserved_allocated, b.reserved_allocated, layers),
                 reserved_extrapolated=True)
    return _reserved(full, traces[-2], traces[-1])


def _reserved(full: Trace, shallow: Trace, deeper: Trace) -> Trace:
    """The full depth's reserved peak: a replay of its events, made from the two deepest traces' events. A line
    through depths is wrong here (measured with the replays of traces at depths 1-5 and at the real depth): per
    layer, Llama-2-7B (LoRA, b1 x s512) reserves 398, 420, 398, 400 MiB where it allocates 397.2 MiB each time (20 MiB
    segments fill in steps), and a line through depths 1 and 2 misses its 32-layer reserved peak by -1.4 %;
    Llama-3.2-1B (full, b2 x s1024, no checkpointing) reserves 546-570 MiB over its live peak at depths 1-3 but
    5,057 MiB at its 16 layers, so every line missed by about -15 %. The deepened events of these (and of
    Qwen2.5-0.5B LoRA, gemma-2-2b LoRA at s512) replayed exactly as the full-depth trace's did: same event count, same
    live peak, same reserved peak (benchmarks/results/allocator_catalog.md). The deepened events must reproduce the
    extrapolated live-bytes peak exactly; if they do not (or cannot be built), the line is kept and marked, and the
    exact mode traces the real depth instead. That check caught a line too: gemma-2-2b's deepened events equal its
    26-layer trace's, but the live peak on the line through 1-3 layers is 0.27 % above the real one (9,183,236,030
    vs 9,158,070,206 B, LoRA b2 x s512), so it is traced at full depth."""
    events = deepen(shallow.events, deeper.events, (full.layers - deeper.layers) // (deeper.layers - shallow.layers))
    if events is None:
        return full
    stats = replay(events)
    if stats.peak_requested_bytes != full.peak:
        return full
    return dataclasses.replace(full, peak_reserved=stats.peak_reserved_bytes,
                               reserved_allocated=stats.allocated_at_peak_reserved_bytes, reserved_extrapolated=False)
