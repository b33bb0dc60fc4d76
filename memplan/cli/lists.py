"""`memplan models` and `memplan gpus`: the shipped catalogs."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import app
from memplan.cli.options import JsonOpt


@app.command()
def models(search: Annotated[str | None, typer.Option("--search", help="only names or hub ids containing this")]
           = None, json_out: JsonOpt = False) -> None:
    """The model catalog with exact parameter counts."""
    from memplan.cli import render
    from memplan.spec.catalog import catalog_entries, catalog_param_count, resolve_model

    rows = []
    needle = (search or "").strip().lower()
    for e in catalog_entries():
        if needle and needle not in e.short_name and needle not in e.hf_id.lower():
            continue
        spec = resolve_model(e.hf_id)
        # an architecture outside the formulas: the entry's verified count (published, checked against the built
        # model in tests/test_catalog.py)
        rows.append({"name": e.short_name, "hf_id": e.hf_id, "model_type": spec.model_type,
                     "parameters": spec.num_parameters if spec.analytic else catalog_param_count(e),
                     "analytic": spec.analytic})
    if json_out:
        render.emit_json({"models": rows})
        return
    out = render.table(["name", "hub id", "type", "parameters"])
    for r in rows:
        out.add_row(r["name"], r["hf_id"], r["model_type"],
                      (f"{r['parameters']:,}" if r["parameters"] else "-") + ("" if r["analytic"] else " (exact mode)"))
    render.console.print(out)


@app.command()
def gpus(json_out: JsonOpt = False) -> None:
    """The GPU catalog (and the detected GPU, if any)."""
    from memplan.cli import render
    from memplan.errors import MemplanError
    from memplan.spec.hardware import detect_gpu, gpu_catalog

    seen, rows = set(), []
    for key, g in gpu_catalog().items():
        if g.key == key and g.name not in seen:
            seen.add(g.name)
            rows.append({"key": key, "name": g.name, "memory_bytes": g.memory_bytes, "bf16": g.bf16,
                         "dense_bf16_tflops": g.dense_bf16_tflops})
    try:
        detected = detect_gpu().name
    except MemplanError:
        detected = None
    if json_out:
        render.emit_json({"gpus": rows, "detected": detected})
        return
    out = render.table(["name (--gpu)", "GPU", "GiB", "bf16", "bf16 TFLOPS"])
    for r in rows:
        out.add_row(r["key"], r["name"], f"{r['memory_bytes'] / 2**30:.1f}", "yes" if r["bf16"] else "no",
                      str(r["dense_bf16_tflops"] or "-"))
    render.console.print(out)
    render.console.print(f"detected: {detected or 'no NVIDIA GPU'}")
