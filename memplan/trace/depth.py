"""Peak memory is linear in the number of decoder layers: extrapolate traces of k, k+1 (checked at k+2) layers to
the real depth, each phase's peak on its own line."""

from __future__ import annotations

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

    def line(x: int, y: int, n: int) -> int:
        return x + (y - x) * (n - a.layers)

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
    return Trace(layers=layers, peak=peaks[phase], weights=line(a.weights, b.weights, layers),
                 states=line(a.states, b.states, layers), forward_end=line(a.forward_end, b.forward_end, layers),
                 trainable=line(a.trainable, b.trainable, layers), params=line(a.params, b.params, layers),
                 phase=phase, phase_peaks=peaks,
                 by_module={k: line(a.by_module.get(k, 0), v, layers) for k, v in b.by_module.items()})
