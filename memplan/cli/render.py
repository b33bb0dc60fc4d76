"""The one output sink: rich tables for people, JSON for scripts."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from memplan.fit import Candidate, FitResult
from memplan.predict.breakdown import Breakdown, Verdict
from memplan.probe.result import ProbeResult
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig, resolve_attention
from memplan.units import fmt_bytes, fmt_gib

console = Console()


@contextlib.contextmanager
def search_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for a long fit search (shown from its first report on, removed at the end)."""
    from rich.progress import Progress

    bar = Progress(console=Console(stderr=True), transient=True)
    task: list[Any] = []

    def report(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task("searching configurations", total=total))
        bar.update(task[0], completed=done)

    try:
        yield report
    finally:
        if task:
            bar.stop()


def emit_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def config_dict(spec: ModelSpec, train: TrainConfig) -> dict[str, Any]:
    out = train.to_dict()
    out["attn"] = resolve_attention(spec.family, train.attn).value
    out["effective_batch"] = train.effective_batch
    return out


def estimate_json(spec: ModelSpec, train: TrainConfig, bd: Breakdown, gpu: GPU | None, usable: int | None) -> dict:
    data: dict[str, Any] = {
        "model": {"name": spec.name, "model_type": spec.model_type, "parameters": bd.params or spec.num_parameters,
                  "trainable_parameters": bd.trainable_params},
        "config": config_dict(spec, train),
        "memory": bd.memory_dict(),
        "peak_phase": bd.phase,
        "phases": dict(bd.phases),
        "method": bd.method,
    }
    if bd.by_module:
        data["by_module"] = dict(bd.by_module)
    if gpu is not None and usable is not None:
        data["gpu"] = {"name": gpu.name, "memory_bytes": gpu.memory_bytes, "usable_bytes": usable}
        data["fits"] = bd.verdict(usable) is Verdict.FITS
        data["verdict"] = bd.verdict(usable).value
        data["band"] = bd.band
    if bd.note:
        data["note"] = bd.note
    return data


def breakdown_table(bd: Breakdown, *, explain: bool) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("", no_wrap=True)
    if explain:
        table.add_column("why")
    rows = [(t.name, t.bytes, t.explain) for t in bd.terms]
    where = f"run peak, during {bd.phase}" if bd.phase in ("load", "eval") else f"reference-step peak, during " \
        f"{bd.phase}"
    rows += [("peak allocated", bd.peak_allocated_bytes, where),
             ("peak reserved", bd.peak_reserved_bytes, bd.reserved_explain or "CUDA caching allocator at the peak"),
             ("CUDA context", bd.cuda_context_bytes, "context and loaded kernels, outside the allocator"),
             ("total (nvidia-smi)", bd.total_bytes, "reserved + context: compared with the card")]
    top = max(bd.total_bytes, 1)
    for name, nbytes, why in rows:
        bar = "█" * max(0, round(30 * nbytes / top))
        cells = [name, f"{nbytes / 2**30:.2f}", bar] + ([why] if explain else [])
        table.add_row(*cells, style="bold" if name.startswith("total") else None)
    return table


def print_estimate(spec: ModelSpec, train: TrainConfig, bd: Breakdown, gpu: GPU | None, usable: int | None,
                   explain: bool) -> None:
    if bd.note:
        console.print(f"[yellow]{bd.note}[/]")
    console.print(f"[bold]{spec.name}[/] ({(bd.params or spec.num_parameters) / 1e9:.2f} B params, "
                  f"{bd.trainable_params:,} trainable) · "
                  f"{'inference, generate' if bd.method == 'inference' else _describe(train, spec)}")
    console.print(breakdown_table(bd, explain=explain))
    if bd.phases:
        peak = bd.phase if bd.phase in {name for name, _ in bd.phases} else "step"
        console.print("run phases (peak allocated): " + " · ".join(
            f"[bold]{name} {fmt_gib(b)} (the peak)[/]" if name == peak else f"{name} {fmt_gib(b)}"
            for name, b in bd.phases), highlight=False)
    if bd.by_module:
        rows = table(["live at the peak, allocated by", "GiB"])
        for name, nbytes in bd.by_module[:12]:
            rows.add_row(name, f"{nbytes / 2**30:.3f}")
        console.print(rows)
    if bd.host_bytes:
        console.print(f"host memory for the offloaded states: {fmt_gib(bd.host_bytes)} per node")
    if gpu is not None and usable is not None:
        console.print(f"{_verdict(bd.verdict(usable))} on {gpu.name}: {fmt_gib(bd.total_bytes)} "
                      f"({fmt_gib(bd.upper_bytes)} with the +{100 * bd.band:.0f} % band) of "
                      f"{fmt_gib(usable)} usable ({fmt_gib(gpu.memory_bytes)} total)")
        if bd.verdict(usable) is Verdict.TIGHT:
            console.print("[yellow]tight: the estimate fits, but published runs have exceeded estimates like it "
                          f"by up to +{100 * bd.band:.0f} % (benchmarks/results/band.md); probe it "
                          "(memplan probe) before a long run[/]")


def page_title(spec: ModelSpec, train: TrainConfig) -> str:
    """The model and the configuration in one line (the timeline page's title)."""
    return f"{spec.name} · {_describe(train, spec)}"


def note_stderr(text: str) -> None:
    """One line on stderr (beside --json output on stdout)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(text)


def _describe(train: TrainConfig, spec: ModelSpec) -> str:
    parts = [train.method.value]
    if train.is_lora and train.adapter.value == "oft":
        parts.append(f"oft block {train.oft_block_size}" if train.oft_rank == 0 else f"oft r={train.oft_rank}")
    elif train.is_lora:
        parts.append(f"r={train.lora_rank}" + (f", {train.adapter.value}" if train.adapter.value != "lora" else "")
                     + (", pissa init" if train.pissa_init else ""))
    if train.method.value == "qlora":
        parts.append(f"{train.quant_bits}-bit")
    parts += [train.precision.value, f"micro-batch {train.batch_size} x accum {train.grad_accum}",
              f"seq {train.seq_len}", "checkpointing" if train.checkpointing else "no checkpointing",
              train.optimizer.value, resolve_attention(spec.family, train.attn).value,
              f"stack {train.stack.value}"]
    if train.gpus > 1 or train.sharding.value != "none":
        dist = "DDP" if train.sharding.value == "none" else train.sharding.value
        nodes = f" on {train.nodes} nodes" if train.nodes > 1 else ""
        offload = f" + offload {train.offload.value}" if train.offload.value != "none" else ""
        parts.append(f"{train.gpus} GPUs{nodes}, {dist}{offload} (memory per rank)")
    return ", ".join(parts)


def candidate_json(c: Candidate, spec: ModelSpec) -> dict[str, Any]:
    return {"config": config_dict(spec, c.train), "memory": c.breakdown.memory_dict(), "fits": c.fits,
            "verdict": c.verdict.value, "band": c.breakdown.band,
            "predicted_tokens_per_s": round(c.tokens_per_s, 1), "peak_phase": c.breakdown.phase,
            "estimate_method": c.breakdown.method}


def fit_json(res: FitResult) -> dict[str, Any]:
    spec = res.model
    best = res.best or res.best_effort
    return {
        "model": {"name": spec.name, "model_type": spec.model_type, "parameters": spec.num_parameters},
        "gpu": {"name": res.gpu.name, "memory_bytes": res.gpu.memory_bytes, "usable_bytes": res.usable_bytes},
        "margin": res.margin, "global_batch": res.global_batch, "searched": res.searched,
        "left_out": list(res.left_out),
        "fits": res.fits, "verdict": best.verdict.value, "band": best.breakdown.band,
        "config": config_dict(spec, best.train),
        "memory": best.breakdown.memory_dict(),
        "ranked": [candidate_json(c, spec) for c in res.ranked],
        "suggestions": [{"change": s.change, **candidate_json(s.candidate, spec)} for s in res.suggestions],
        "fewest_gpus": candidate_json(res.fewest_gpus, spec) if res.fewest_gpus else None,
    }


def _verdict(v: Verdict) -> str:
    color = {Verdict.FITS: "green", Verdict.TIGHT: "yellow"}.get(v, "red")
    return f"[{color}]{v.value}[/]"


def print_as_written(c: Candidate, res: FitResult, path: str | None) -> None:
    console.print(f"{path} as written: {_describe(c.train, res.model)} — {fmt_gib(c.total_bytes)} of "
                  f"{fmt_gib(res.usable_bytes)} usable: {_verdict(c.verdict)}")


def print_fit(res: FitResult, top: int) -> None:
    spec, gpu = res.model, res.gpu
    head = f"[bold]{spec.name}[/] on {gpu.name} ({fmt_gib(res.usable_bytes)} usable, margin {res.margin:.0%}), " \
           f"effective batch {res.global_batch} · {res.searched} configurations searched"
    console.print(head)
    for line in res.left_out:
        console.print(f"[dim]left out: {line}[/]", highlight=False)
    if res.best is None:
        be = res.best_effort
        if be.verdict is Verdict.TIGHT:
            console.print(f"[yellow bold]tight[/]: nothing fits with its band; the smallest configuration needs "
                          f"{fmt_gib(be.total_bytes)} ({fmt_gib(be.breakdown.upper_bytes)} with its "
                          f"+{100 * be.breakdown.band:.0f} % band) ({_describe(be.train, spec)}): probe it "
                          "(memplan fit --probe) before a long run")
        else:
            console.print(f"[red bold]does not fit[/]: the smallest configuration needs "
                          f"{fmt_gib(be.total_bytes)} ({_describe(be.train, spec)})")
        rows = table(["change", "GiB", "fits", "tokens/s"])
        for s in res.suggestions:
            rows.add_row(s.change, f"{s.candidate.total_bytes / 2**30:.2f}", "yes" if s.candidate.fits else "no",
                          f"{s.candidate.tokens_per_s:,.0f}")
        console.print("What would make it fit:")
        console.print(rows)
        return
    best = res.best
    console.print(f"[green bold]fits[/]: fastest is {_describe(best.train, spec)} — "
                  f"{fmt_gib(best.total_bytes)} ({fmt_gib(best.breakdown.upper_bytes)} with its "
                  f"+{100 * best.breakdown.band:.0f} % band), ~{best.tokens_per_s:,.0f} tokens/s predicted")
    multi = len({c.train.gpus for c in res.ranked}) > 1 or best.train.gpus > 1
    fewest = res.fewest_gpus
    if multi and fewest is not None:
        console.print(f"fewest GPUs: {_describe(fewest.train, spec)} — {fmt_gib(fewest.total_bytes)}, "
                      f"~{fewest.tokens_per_s:,.0f} tokens/s")
    cols = ["#"] + (["GPUs", "sharding"] if multi else []) + ["micro x accum", "precision", "ckpt", "rank", "GiB",
                                                             "+band", "headroom", "rel. speed"]
    ranked = table(cols)
    for i, c in enumerate(res.ranked[:top], 1):
        dist = [str(c.train.gpus), c.train.sharding.value + (f"+{c.train.offload.value}" if c.train.offload.value
                                                             != "none" else "")] if multi else []
        ranked.add_row(f"{i}{'*' if c.breakdown.method == 'exact' else ''}", *dist,
                       f"{c.train.batch_size} x {c.train.grad_accum}", c.train.precision.value,
                       "on" if c.train.checkpointing else "off", str(c.train.lora_rank) if c.train.is_lora else "-",
                       f"{c.total_bytes / 2**30:.2f}", f"{c.breakdown.upper_bytes / 2**30:.2f}",
                       f"{(res.usable_bytes - c.breakdown.upper_bytes) / 2**30:.2f}",
                       f"{c.tokens_per_s / best.tokens_per_s:.2f}")
    console.print(ranked)
    if any(c.breakdown.method == "exact" for c in res.ranked[:top]):
        console.print("* re-checked with the exact mode (fake-tensor trace of the real model)")


def note(text: str) -> None:
    console.print(text, highlight=False)


def print_export(fmt: str | None, output: str | None, files: list[Any], train: TrainConfig | None) -> None:
    """One line on stderr about --export: what was written and how to launch it, or that nothing was."""
    if not fmt or not output:
        return
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not files:
        err.print(f"memplan: nothing fits: nothing written to {output}")
        return
    launch = ""
    if fmt == "llamafactory" and train is not None:
        from memplan.formats.llamafactory import launch_line

        launch = "; " + launch_line(train, output).removeprefix("# ")
    err.print(f"memplan: wrote {', '.join(map(str, files))}{launch}")


def table(cols: list[str]) -> Table:
    t = Table(show_header=True, header_style="bold")
    for col in cols:
        t.add_column(col)
    return t


def print_probe(result: ProbeResult, predicted: Breakdown | None) -> None:
    """The measurement, beside the estimate when there is one (a model no estimator handles has none)."""
    colour = {"ok": "green", "oom": "red"}.get(result.status.value, "yellow")
    console.print(f"[{colour} bold]{result.status.value}[/] on {result.device}"
                  + (" (cached)" if result.cached else "") + (f": {result.error}" if result.error else ""))
    if result.status.value != "ok":
        return

    def est(nbytes: int) -> str:
        return fmt_bytes(nbytes) if predicted else "-"

    rows = table(["measured", "value", f"{predicted.method if predicted else 'no'} estimate", "error"])
    err = f"{100 * (predicted.peak_allocated_bytes / result.peak_allocated_bytes - 1):+.2f} %" if predicted else ""
    rows.add_row("peak allocated", fmt_bytes(result.peak_allocated_bytes),
                 est(predicted.peak_allocated_bytes if predicted else 0), err)
    if result.device != "cpu":  # the CPU allocator does not cache: reserved == allocated there
        rows.add_row("peak reserved", fmt_bytes(result.peak_reserved_bytes),
                     est(predicted.peak_reserved_bytes if predicted else 0), "")
    if result.nvml_used_bytes is not None:
        rows.add_row("nvidia-smi used", fmt_bytes(result.nvml_used_bytes),
                     est(predicted.total_bytes if predicted else 0), "")
    if len(result.rank_peak_bytes) > 1:
        rows.add_row("peak per rank", ", ".join(fmt_bytes(b) for b in result.rank_peak_bytes), "", "")
    rows.add_row("step time", f"{result.step_time_s:.3f} s", "", "")
    rows.add_row("tokens/s", f"{result.tokens_per_s:,.0f}", "", "")
    rows.add_row("losses", ", ".join(f"{x:.3f}" for x in result.losses), "", "")
    console.print(rows)


def _knobs(t: TrainConfig) -> str:
    rank = f" r{t.lora_rank}" if t.is_lora else ""
    ranks = f", {t.gpus} GPUs {'DDP' if t.sharding.value == 'none' else t.sharding.value}" \
        if t.gpus > 1 or t.sharding.value != "none" else ""
    return (f"micro {t.batch_size} x accum {t.grad_accum}, {t.precision.value}, "
            f"ckpt {'on' if t.checkpointing else 'off'}{rank}, {t.optimizer.value}, {t.attn.value}{ranks}")


def print_trial(rec: Any, best_tokens_per_s: float) -> None:
    """One line per trial while the study runs: configuration, outcome, peak, tokens/s, best so far."""
    from memplan.tune.study import TrialSource, TrialStatus

    what = {TrialSource.PROBE: f"{rec.status.value:7s}",
            TrialSource.PREDICTED_INFEASIBLE: "skip: predicted over capacity",
            TrialSource.MONOTONE_INFEASIBLE: "skip: larger than an OOM",
            TrialSource.PRUNED: "skip: predicted slower"}[rec.source]
    measured = f" peak {fmt_bytes(rec.peak_bytes)}, {rec.tokens_per_s:,.0f} tokens/s" \
        if rec.source is TrialSource.PROBE and rec.status is TrialStatus.OK else ""
    best = f" | best {best_tokens_per_s:,.0f} tokens/s" if best_tokens_per_s else ""
    console.print(f"#{rec.number:<3d} {_knobs(rec.train)} → {what}{measured}{best}")


def tune_json(res: Any, spec: ModelSpec) -> dict[str, Any]:
    def rec(r: Any) -> dict[str, Any]:
        return {"number": r.number, "config": config_dict(spec, r.train), "source": r.source.value,
                "status": r.status.value, "tokens_per_s": round(r.tokens_per_s, 1), "peak_bytes": r.peak_bytes,
                "feasible": r.feasible}

    return {"study": res.study_name, "storage": res.storage, "usable_bytes": res.usable_bytes,
            "fits": res.best is not None, "confirmed_by_probe": res.best is not None,
            "best": rec(res.best) if res.best else None, "probes": res.probes, "ooms": res.ooms,
            "calibration": res.calibration, "trials": [rec(r) for r in res.trials]}


def print_tune(res: Any, spec: ModelSpec, gpu: GPU) -> None:
    from memplan.tune.study import TrialSource, TrialStatus

    console.print(f"study {res.study_name} ({res.probes} probes, {res.ooms} OOM, {len(res.trials)} trials)")
    multi = any(r.train.gpus > 1 for r in res.trials)
    rows = table(["#", *(["GPUs"] if multi else []), "micro x accum", "precision", "ckpt", "attn", "outcome", "peak",
                  "tokens/s"])
    for r in sorted(res.trials, key=lambda r: (r.source is not TrialSource.PROBE, -r.tokens_per_s)):
        t = r.train
        rows.add_row(str(r.number), *([str(t.gpus)] if multi else []), f"{t.batch_size} x {t.grad_accum}",
                     t.precision.value,
                     "on" if t.checkpointing else "off", t.attn.value,
                     r.status.value if r.source is TrialSource.PROBE else r.source.value, fmt_bytes(r.peak_bytes),
                     f"{r.tokens_per_s:,.0f}" if r.source is TrialSource.PROBE and r.status is TrialStatus.OK
                     else "-")
    console.print(rows)
    if res.best is None:
        console.print(f"[red bold]no configuration confirmed[/] on {gpu.name}: nothing probed fits "
                      f"{fmt_bytes(res.usable_bytes)}")
        return
    b = res.best
    console.print(f"[green bold]fits — confirmed by probe[/]: {_knobs(b.train)} (effective batch "
                  f"{b.train.effective_batch}), {b.tokens_per_s:,.0f} tokens/s, peak {fmt_bytes(b.peak_bytes)}, "
                  f"headroom {fmt_bytes(res.usable_bytes - b.peak_bytes)} on {gpu.name}")


def echo_raw(line: str) -> None:
    """The supervised command's output, passed through untouched."""
    sys.stdout.write(line)
    sys.stdout.flush()


def print_run(result: Any) -> None:
    from memplan.run.supervisor import RunOutcome

    rows = table(["attempt", "configuration", "resumed from", "exit", "status", "time"])
    for a in result.attempts:
        rows.add_row(str(a.index), _knobs(a.train), a.resumed_from or "-", str(a.returncode), a.status.value,
                     f"{a.duration_s:.0f} s")
    console.print(rows)
    color = "green" if result.outcome is RunOutcome.FINISHED else "red"
    console.print(f"[{color} bold]{result.outcome.value}[/] after {len(result.attempts)} attempt(s)"
                  f"{': ' + result.reason if result.reason else ''} · decisions in {result.log_path}")
