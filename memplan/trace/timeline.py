"""`memplan trace --timeline step.html`: the traced step drawn as one self-contained HTML file (inline SVG and a
small inline script; no network): allocated and simulated reserved memory over the step's allocation events, its
phases and layers, the peak with the op and module that set it, and the largest tensors live at the peak.

The real depth's events: a trace at that depth where the exact mode made one, else the two deepest traces' events
deepened (trace/deepen.py), the repeated layer's copies renumbered; the page says which."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from importlib import resources

from memplan.predict.allocator import ALLOC, Allocator
from memplan.spec.model import ModelSpec
from memplan.trace.deepen import deepen_with_sources
from memplan.trace.exact import ExactRun
from memplan.trace.step import Trace

GIB = 2**30
POINTS = 1500  # buckets the event sequence is drawn in (each keeps its highest and lowest allocated bytes)
TOP_TENSORS = 12
_LAYER = re.compile(r"(\.layers\.)(\d+)")
Label = tuple[str, str, str]  # (phase, module, op), trace/labels.py


@dataclass(frozen=True, slots=True, kw_only=True)
class StepEvents:
    """The real depth's allocation events with their labels (None for frees), and how they were obtained."""

    events: list[tuple[str, int, int, int]]
    labels: list[Label | None]
    how: str


def full_depth_events(run: ExactRun, spec: ModelSpec) -> StepEvents:
    """The real depth's events: traced (the model is shallow, or the exact mode traced its full depth) or deepened."""
    full = run.full if run.full.events else next((t for t in run.traces if t.layers == spec.num_layers), None)
    if full is not None:
        return StepEvents(events=full.events, labels=[full.labels.get(i) for i in range(len(full.events))],
                          how=f"all {full.layers} layers traced")
    shallow, deeper = run.traces[-2], run.traces[-1]
    copies = spec.num_layers - deeper.layers
    made = deepen_with_sources(shallow.events, deeper.events, copies)
    if made is None:  # cannot happen after exact_run (it traces the full depth then); kept as a clear error
        raise ValueError("the traced events do not deepen to the real depth")
    events, sources = made
    return StepEvents(events=events, labels=_renumbered(deeper, sources, copies),
                      how=(f"{shallow.layers} and {deeper.layers} layers traced; the layer the deeper trace adds is "
                           f"repeated {copies} more times to make all {spec.num_layers} layers' events "
                           "(memplan/trace/deepen.py), its copies renumbered"))


def _renumbered(deeper: Trace, sources: list[tuple[int, int, bool]], copies: int) -> list[Label | None]:
    """Each made event's label, `layers.N` renumbered: copy c of the repeated layer N is layer N + c in forward
    (layers run upwards) and N + copies - c in backward (downwards); a traced layer above the repeated one
    (per phase: the lowest layer among the inserted events) moves up by `copies`. The diff may have cut the
    repeated run across a layer's start, so that it ends with what follows the last layer (the final norm, whose
    ops look like a layer's first norm): those events, in every copy but the last, are the next layer's start,
    labelled as the events just before the run (`_rotated`)."""
    labels = deeper.labels
    lowest: dict[str, int] = {}
    for j, _copy, inserted in sources:
        n = _layer(labels.get(j))
        if inserted and n is not None:
            lowest[labels[j][0]] = min(lowest.get(labels[j][0], n), n)
    borrowed = _rotated(deeper, sources)  # a run's tail index j -> the index before the run that it restarts
    out: list[Label | None] = []
    for j, copy, inserted in sources:
        label = labels.get(j)
        if j in borrowed and copy < copies and label is not None:
            head = labels.get(borrowed[j])
            if head is not None and _layer(head) is not None:  # the next layer's start: one layer on from `head`
                step = copies - copy - 1 if head[0] == "backward" else copy + 1
                out.append(_moved(head, step))
                continue
        n = _layer(label)
        if label is None or n is None:
            out.append(label)
        elif inserted:
            out.append(_moved(label, copies - copy if label[0] == "backward" else copy))
        else:
            out.append(_moved(label, copies if n > lowest.get(label[0], n) else 0))
    return out


def _rotated(deeper: Trace, sources: list[tuple[int, int, bool]]) -> dict[int, int]:
    """For each inserted run [j1, j2) whose last events carry no layer (but are the same allocations as those
    just before the run): tail index j -> j - (j2 - j1), the event of the layer's start it stands for."""
    runs: list[list[int]] = []
    for j, copy, inserted in sources:
        if inserted and copy == 0:
            if runs and runs[-1][1] == j:
                runs[-1][1] = j + 1
            else:
                runs.append([j, j + 1])
    events, out = deeper.events, {}
    for j1, j2 in runs:
        for j in range(j2 - 1, j1 - 1, -1):
            before = j - (j2 - j1)
            kind = events[j][0]
            if before < 0 or kind != events[before][0] or _layer(deeper.labels.get(j)) is not None:
                break
            if kind == ALLOC and events[j][2] != events[before][2]:
                break
            out[j] = before
    return out


def _layer(label: Label | None) -> int | None:
    m = _LAYER.search(label[1]) if label else None
    return int(m.group(2)) if m else None


def _moved(label: Label, shift: int) -> Label:
    """The label with its layer number moved by `shift`."""
    return (label[0], _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + shift}", label[1], count=1), label[2])


def band_of(label: Label, after_head: bool) -> str:
    """The strip an allocation is drawn in: `layer N` / `backward layer N`, loss / `backward loss`, the phase, or
    the loaded states. The loss is the head and what the model class's own forward (named by its class, as
    labels.py names the root) computes after it."""
    phase, module, op = label
    if not op:
        return "model states (before the step)"
    m = _LAYER.search(module)
    if m:
        return f"layer {m.group(2)}" if phase == "forward" else f"{phase} layer {m.group(2)}"
    root = module[:1].isupper()
    if phase == "forward" and (module == "lm_head" or (after_head and root)):
        return "loss"
    if phase == "backward" and (module == "lm_head" or root):
        return "backward loss"
    return phase or "step"


def _phase_of(band: str) -> str:
    """The phase strip a band belongs to: forward (its layers), loss, backward (its layers and the loss's)."""
    if band.startswith("layer "):
        return "forward"
    return band.split(" ")[0] if band.startswith("backward") else band


def size_text(nbytes: int) -> str:
    """`12.34 GiB`, or `45.6 MiB` under a GiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def describe(label: Label | None) -> str:
    """`during backward at aten::mm in model.layers.1.mlp` (what the peak label says after its size)."""
    if label is None:
        return ""
    phase, module, op = label
    if not op:
        return "before the step (loaded model states)"
    return f"during {phase} at {op}" + (f" in {module}" if module else "")


def timeline_data(run: ExactRun, spec: ModelSpec, title: str) -> dict:
    """Everything the page draws, downsampled to at most POINTS buckets."""
    step = full_depth_events(run, spec)
    alloc, reserved, live, top, peak_at = _replay(step)
    bands = _bands(step)
    n = len(step.events)
    size = max(1, -(-n // POINTS))
    names: dict[str, int] = {}
    points = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        hi = max(range(start, stop), key=alloc.__getitem__)
        text = (describe(step.labels[hi]) if step.events[hi][0] == ALLOC else "") or bands[hi]
        points.append([start, alloc[hi], min(alloc[start:stop]), max(reserved[start:stop]),
                       names.setdefault(text, len(names))])
    peak_label = f"peak {size_text(alloc[peak_at])} {describe(step.labels[peak_at])}"
    bd = run.breakdown
    loaded = next((i for i, b in enumerate(bands) if not b.startswith("model states")), 0)
    return {"title": title, "how": step.how, "events": n, "points": points, "texts": list(names), "step_from": loaded,
            "phases": _runs(bands, _phase_of),
            "layers": [r for r in _runs(bands, lambda b: b) if "layer " in r[2]],
            "peak": {"at": peak_at, "bytes": alloc[peak_at], "label": peak_label, "band": bands[peak_at]},
            "reserved_peak": max(reserved), "live_at_peak": live, "top": top,
            "breakdown": {"peak_allocated": bd.peak_allocated_bytes, "peak_reserved": bd.peak_reserved_bytes,
                          "note": bd.terms[0].explain.partition("; ")[2]},
            "run_phases": [list(p) for p in bd.phases]}


def _replay(step: StepEvents) -> tuple[list[int], list[int], dict, list[dict], int]:
    """Live (requested) bytes and the allocator model's reserved bytes after each event; the first event at the
    live peak; what was live there: loaded states summed, the largest tensors made in the step one by one."""
    allocator = Allocator()
    handles: dict[int, int] = {}
    alloc, reserved = [], []
    for kind, key, nbytes, stream in step.events:
        if kind == ALLOC:
            handles[key] = allocator.malloc(nbytes, stream)
        else:
            allocator.free(handles.pop(key))
        alloc.append(allocator.requested)
        reserved.append(allocator.reserved)
    peak_at = max(range(len(alloc)), key=alloc.__getitem__)
    made: dict[int, int] = {}  # storage id -> the event that allocated it, for those live at the peak
    for i, (kind, key, _nbytes, _stream) in enumerate(step.events[:peak_at + 1]):
        if kind == ALLOC:
            made[key] = i
        else:
            made.pop(key, None)
    loaded = {i for i in made.values() if not (step.labels[i] or ("", "", ""))[2]}
    made_in_step = sorted((i for i in made.values() if i not in loaded), key=lambda i: -step.events[i][2])
    live = {"loaded_bytes": sum(step.events[i][2] for i in loaded), "loaded_tensors": len(loaded),
            "step_bytes": sum(step.events[i][2] for i in made_in_step), "step_tensors": len(made_in_step)}
    top = [{"bytes": step.events[i][2], "made": describe(step.labels[i])} for i in made_in_step[:TOP_TENSORS]]
    return alloc, reserved, live, top, peak_at


def _bands(step: StepEvents) -> list[str]:
    """Each event's strip; an allocation no module claims stays in the strip before it, and a free too unless it
    happens in another phase (the optimizer's zero_grad frees the gradients, say)."""
    bands, current, after_head = [], "model states (before the step)", False
    for (kind, *_rest), label in zip(step.events, step.labels, strict=True):
        if label is not None and kind != ALLOC:
            if label[0] and label[0] != _step_phase(current):
                current = label[0]
        elif label is not None:
            after_head = (after_head or label[1] == "lm_head") and label[0] == "forward"
            band = band_of(label, after_head)
            unclaimed = not label[1] and label[0] in ("forward", "backward")
            if not (unclaimed and current.startswith(("layer ", f"{label[0]} layer "))):
                current = band
        bands.append(current)
    return bands


def _step_phase(band: str) -> str:
    """The tracker's phase a band is in (the loss is computed in forward and differentiated in backward)."""
    phase = _phase_of(band)
    return {"loss": "forward", "model states (before the step)": ""}.get(phase, phase)


def _runs(bands: list[str], key: object) -> list[list]:
    """[first event, last event + 1, name] for each run of events whose bands have the same key."""
    out: list[list] = []
    for i, band in enumerate(bands):
        name = key(band)  # type: ignore[operator]
        if out and out[-1][2] == name:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1, name])
    return out


def render_html(data: dict) -> str:
    """The page: the template with the data inlined as JSON (`</` escaped so no string can end the script)."""
    template = resources.files("memplan.trace").joinpath("timeline.html").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return template.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)


def write_timeline(path: str, run: ExactRun, spec: ModelSpec, title: str) -> int:
    """Write the page to `path`; its size in bytes."""
    page = render_html(timeline_data(run, spec, title))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return len(page.encode())
