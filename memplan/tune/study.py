"""The tuner: of all configurations with the user's effective batch and sequence length, find the fastest that
does not run out of memory, with as few real probes as possible.

The estimator steers an Optuna study (ask/tell, so a probe's OOM is a COMPLETE trial with a violated constraint,
not a FAIL): the analytic ranking's best candidates are enqueued first; a configuration predicted over capacity
(after calibration), or larger than one that already went OOM with the same other knobs, is recorded with its
estimate as infeasible and never probed; one predicted well below the best measured speed is recorded as
pruned. Every probe updates the per-study calibration (measured / predicted memory and speed), kept in the study.

Many workers (processes, machines) can run `tune` on one study in a shared database: each re-reads the finished
trials before it asks, a configuration another worker is already probing is left to it (the lower trial number
wins), `n_probes` is the study's budget, and with an RDB URL a heartbeat marks a dead worker's trial failed and
Optuna's RetryFailedTrialCallback puts its configuration back in the queue.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from memplan._imports import try_import
from memplan.errors import ConfigError
from memplan.fit import predicted_tokens_per_s, search_space
from memplan.predict.estimator import estimate
from memplan.probe.result import ProbeResult, ProbeStatus
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.space import DIMENSIONS, SearchSpace, candidate_params
from memplan.spec.train import TrainConfig, train_from_dict

Evaluator = Callable[[TrainConfig], ProbeResult]
HEARTBEAT_S = 20  # RDB storages: a running probe beats this often ...
GRACE_S = 120  # ... and a trial silent this long belonged to a dead worker: failed, then retried
SPEED_PRUNE = 0.8  # skip candidates whose calibrated speed is below this share of the best measured one
# the trial parameters: the search dimensions but the accumulation, which follows from micro-batch and GPUs
KNOBS = tuple(d for d in DIMENSIONS if d != "grad_accum")


class TrialSource(str, Enum):
    """How a trial's record was decided; the value is what the study's user attrs and --json hold."""
    PROBE = "probe"  # measured by a real probe
    PREDICTED_INFEASIBLE = "predicted-infeasible"  # calibrated prediction over capacity: never probed
    MONOTONE_INFEASIBLE = "monotone-infeasible"  # larger micro-batch than an OOM with the same other knobs
    PRUNED = "pruned"  # predicted well below the best measured speed
    REPEAT = "repeat"  # the sampler proposed a known configuration: told the same record again
    CLAIMED = "claimed"  # another worker was probing it (a PRUNED trial's user attr only, never a record)
    BUDGET = "budget"  # claimed when concurrent claims had used the --n-probes budget (a PRUNED trial's attr only)
    OUTSIDE = "outside-space"  # a sampled combination that is not a candidate (a PRUNED trial's user attr only)


class TrialStatus(str, Enum):
    """A trial's outcome: a probe's status (memplan.probe.result.ProbeStatus, same values), or skipped."""
    OK = ProbeStatus.OK.value
    OOM = ProbeStatus.OOM.value
    ERROR = ProbeStatus.ERROR.value
    TIMEOUT = ProbeStatus.TIMEOUT.value
    SKIPPED = "skipped"  # not probed (source is not probe)

    @classmethod
    def of(cls, status: ProbeStatus) -> TrialStatus:
        return cls(status.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialRecord:
    number: int
    train: TrainConfig
    source: TrialSource
    status: TrialStatus
    tokens_per_s: float
    peak_bytes: int  # measured when probed, else the calibrated prediction
    feasible: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TuneResult:
    study_name: str
    storage: str
    usable_bytes: int
    best: TrialRecord | None
    trials: tuple[TrialRecord, ...]
    calibration: dict[str, float] = field(default_factory=dict)

    @property
    def probes(self) -> int:
        return sum(1 for t in self.trials if t.source is TrialSource.PROBE)

    @property
    def ooms(self) -> int:
        return sum(1 for t in self.trials if t.source is TrialSource.PROBE and t.status is TrialStatus.OOM)


def study_name(spec: ModelSpec, base: TrainConfig, usable: int, global_batch: int, space: list[TrainConfig]) -> str:
    """Stable name from the model, the capacity and the knobs, so an interrupted study resumes."""
    material = json.dumps({"config": spec.config, "base": base.to_dict(), "usable": usable, "gb": global_batch,
                           "space": sorted(json.dumps(_params(t), sort_keys=True) for t in space)}, sort_keys=True)
    label = re.sub(r"[^A-Za-z0-9.]+", "-", spec.name.rsplit("/", 1)[-1]).strip("-")
    return f"memplan-{label}-{hashlib.sha256(material.encode()).hexdigest()[:12]}"


def _params(t: TrainConfig) -> dict[str, object]:
    d = candidate_params(t)
    return {k: d[k] for k in KNOBS}


def _key(t: TrainConfig) -> str:
    return json.dumps(_params(t), sort_keys=True)


def tune(spec: ModelSpec, base: TrainConfig, gpu: GPU, evaluator: Evaluator, *, space: SearchSpace,
         usable_bytes: int, device: str = "cuda", storage: str = "sqlite:///memplan-tune.db", n_probes: int = 4,
         timeout_s: float | None = None, seed: int = 0, on_trial: Callable[[TrialRecord, float], None] | None = None,
         accept: Callable[[TrainConfig], bool] | None = None) -> TuneResult:
    """Run (or resume) the study; returns every trial and the fastest configuration measured to fit. `accept`:
    the candidates the user's launcher would run (fit's filter: what LLaMA-Factory refuses is never probed)."""
    optuna = try_import("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    candidates = [t for t in search_space(base, gpu, space) if accept is None or accept(t)]
    if not candidates:
        raise ConfigError("every configuration in the search is one LLaMA-Factory refuses to launch: widen the "
                          "search (--precision, --method, --gpus)")
    by_key = {_key(t): t for t in candidates}
    name = study_name(spec, base, usable_bytes, space.global_batch, candidates)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)  # reads Trial.set_constraint
    study = _open_study(optuna, storage, name, sampler)
    predicted = {k: _prediction(spec, t, gpu, device) for k, t in by_key.items()}
    known = _known(study, by_key)
    if not study.trials:  # seed with the analytic ranking: predicted to fit, fastest first
        for k in _ranked(predicted, usable_bytes, {})[:n_probes]:
            study.enqueue_trial(_params(by_key[k]))
    _fail_stale(optuna, study)
    _requeue_unfinished(optuna, study, known, by_key)
    start, exhausted = time.perf_counter(), 0
    worker = f"{socket.gethostname()}:{os.getpid()}"
    while _probes(known) + _in_flight(optuna, study, worker) < n_probes and len(known) < len(by_key) and \
            exhausted < 3 * len(by_key):
        if timeout_s is not None and time.perf_counter() - start > timeout_s:
            break
        _fail_stale(optuna, study)
        trial = study.ask(_distributions(optuna, candidates))
        key = json.dumps({k: trial.params[k] for k in KNOBS}, sort_keys=True)
        if key not in by_key:  # knobs sampled one by one: this combination is not a candidate (GPUs x micro)
            trial.set_user_attr("source", TrialSource.OUTSIDE.value)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            exhausted += 1
            continue
        known = _known(study, by_key)  # other workers may have finished trials since
        cal = _calibration(known, predicted, usable_bytes)
        if key in known:  # the sampler proposed a configuration we already know: tell the same, do not probe
            _tell(study, trial, known[key], TrialSource.REPEAT)
            exhausted += 1
            continue
        if _claimed(study, trial, key):  # another worker is probing it, or finished it since `known` was read
            known = _known(study, by_key)
            if key in known:
                _tell(study, trial, known[key], TrialSource.REPEAT)
                exhausted += 1
                continue
            trial.set_user_attr("source", TrialSource.CLAIMED.value)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            exhausted += 1
            continue
        trial.set_user_attr("worker", worker)
        if _probes(_known(study, by_key)) + _in_flight(optuna, study, worker, before=trial.number) >= n_probes:
            trial.set_user_attr("source", TrialSource.BUDGET.value)  # the claims ahead of this one use it up
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            break
        try:
            with _heartbeat(study, trial):
                record = _decide(trial.number, by_key[key], key, known, predicted, cal, usable_bytes, evaluator,
                                 resumed=bool(trial.user_attrs.get("requeued")))
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) or broken: not a claim that blocks a resumed study
            with contextlib.suppress(Exception):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        known[key] = record
        _tell(study, trial, record, record.source)
        study.set_user_attr("calibration", _calibration(known, predicted, usable_bytes))
        if on_trial:
            on_trial(record, max((r.tokens_per_s for r in known.values()
                                  if r.source is TrialSource.PROBE and r.feasible), default=0.0))
    known = _known(study, by_key)  # the whole study: every worker's trials
    feasible = [r for r in known.values()
                if r.feasible and r.source is TrialSource.PROBE and r.status is TrialStatus.OK]
    best = max(feasible, key=lambda r: r.tokens_per_s) if feasible else None
    return TuneResult(study_name=name, storage=storage, usable_bytes=usable_bytes, best=best,
                      trials=tuple(sorted(known.values(), key=lambda r: r.number)),
                      calibration=_calibration(known, predicted, usable_bytes))


_RACES = ("already exists", "UNIQUE constraint failed", "database is locked", "duplicate key value")


def _open_study(optuna, url: str, name: str, sampler):  # noqa: ANN001, ANN202
    """create_study(load_if_exists) on `url`: sqlite as is; other RDB URLs (postgresql://, mysql://) with a
    heartbeat and retry of dead workers' trials (RDBStorage + RetryFailedTrialCallback). Workers starting together
    race to create Optuna's tables (and sqlite locks while one writes): retried. Anything else is the user's
    storage problem: one ConfigError line naming the URL and the cause."""
    import warnings

    from memplan.errors import ConfigError, MissingExtra

    if "://" not in url:
        raise ConfigError(f"--storage {url!r} is not a database URL: use sqlite:///path/to/study.db or "
                          "postgresql://user@host/db")
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(8):
        try:
            storage = url if not url.startswith(("postgresql", "mysql")) else optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=2))
            return optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                       load_if_exists=True)
        except ImportError:
            raise MissingExtra(f"--storage {url.split(':', 1)[0]}: install its driver, e.g. pip install "
                               "'memplan[distributed]' (psycopg) for PostgreSQL") from None
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors, classified below
            text = str(err)
            if any(race in text for race in _RACES) and attempt < 7:
                time.sleep(0.2 * (attempt + 1))
                continue
            root = err  # Optuna wraps the driver's error (StorageInternalError): name the cause
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__  # type: ignore[assignment]
            why = str(root).strip() or str(err).strip() or type(err).__name__
            first = why.splitlines()[0].split("(Background on this error")[0].strip()
            raise ConfigError(f"--storage {url!r}: {type(root).__name__}: {first[:300]}") from None
    raise AssertionError("unreachable")


def _fail_stale(optuna, study) -> None:  # noqa: ANN001
    """Fail the RUNNING trials of workers that are gone, so their configurations are probed again: by heartbeat
    on RDB storages, and on this host (sqlite has no heartbeat) by the worker's pid."""
    if getattr(study._storage, "get_heartbeat_interval", lambda: None)():  # noqa: SLF001
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(Exception):  # another worker may fail it first
                study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)  # noqa: SLF001


def _in_flight(optuna, study, worker: str, before: int | None = None) -> int:  # noqa: ANN001
    """Probes other workers are running now (claimed before trial `before`, when given): they count against the
    study's --n-probes budget, so concurrent workers never overshoot it (the lower trial number goes first)."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return sum(1 for t in running if t.user_attrs.get("worker") not in (None, worker)
               and (before is None or t.number < before))


def _requeue_unfinished(optuna, study, known: dict[str, TrialRecord], by_key: dict[str, TrainConfig]) -> None:  # noqa: ANN001
    """Configurations whose probe failed without a result (an interrupted or dead worker) go back in the queue,
    ahead of the sampler, once each."""
    states = optuna.trial.TrialState
    waiting = {json.dumps({k: t.params.get(k) for k in KNOBS}, sort_keys=True)
               for t in study.get_trials(deepcopy=False, states=(states.WAITING, states.RUNNING))}
    for t in study.get_trials(deepcopy=False, states=(states.FAIL,)):
        key = json.dumps({k: t.params.get(k) for k in KNOBS}, sort_keys=True)
        if key in by_key and key not in known and key not in waiting:
            study.enqueue_trial(_params(by_key[key]), user_attrs={"requeued": True})
            waiting.add(key)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat(study, trial):  # noqa: ANN001, ANN202
    """Beat while the probe runs (Optuna does this inside study.optimize; ask/tell must start it itself)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)  # noqa: SLF001


def _claimed(study, trial, key: str) -> bool:  # noqa: ANN001
    """Another trial with a lower number, RUNNING or COMPLETE, has the same configuration (ties go to the first
    asker). COMPLETE too: a worker that finished it between this worker's read of the finished trials and this
    check left no RUNNING trial behind, and its configuration was probed twice (seen with two workers on
    PostgreSQL)."""
    import optuna

    states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)
    for t in study.get_trials(deepcopy=False, states=states):
        if t.number < trial.number and t.params and \
                json.dumps({k: t.params.get(k) for k in KNOBS}, sort_keys=True) == key:
            return True
    return False


def _prediction(spec: ModelSpec, t: TrainConfig, gpu: GPU, device: str) -> tuple[int, float]:
    """(predicted bytes compared with capacity, predicted tokens/s)."""
    bd = estimate(spec, t, device=device)
    return (bd.total_bytes if device == "cuda" else bd.peak_allocated_bytes), predicted_tokens_per_s(spec, t, gpu)


def _ranked(predicted: dict[str, tuple[int, float]], usable: int, cal: dict[str, float]) -> list[str]:
    mem, speed = cal.get("memory_ratio", 1.0), cal.get("speed_ratio", 1.0)
    fits = [k for k, (b, _) in predicted.items() if b * mem <= usable]
    return sorted(fits, key=lambda k: -predicted[k][1] * speed)


def _decide(number: int, train: TrainConfig, key: str, known: dict[str, TrialRecord],
            predicted: dict[str, tuple[int, float]], cal: dict[str, float], usable: int,
            evaluator: Evaluator, resumed: bool = False) -> TrialRecord:
    pred_bytes = int(predicted[key][0] * cal.get("memory_ratio", 1.0))
    pred_speed = predicted[key][1] * cal.get("speed_ratio", 1.0)

    def skipped(source: TrialSource) -> TrialRecord:
        return TrialRecord(number=number, train=train, source=source, status=TrialStatus.SKIPPED,
                           tokens_per_s=pred_speed, peak_bytes=pred_bytes, feasible=False)

    if pred_bytes > usable:
        return skipped(TrialSource.PREDICTED_INFEASIBLE)
    if _larger_than_an_oom(train, known):
        return skipped(TrialSource.MONOTONE_INFEASIBLE)
    best = max((r.tokens_per_s for r in known.values() if r.source is TrialSource.PROBE and r.feasible),
               default=0.0)
    if best and pred_speed < SPEED_PRUNE * best and not resumed:  # a probe cut short is finished, not pruned
        return skipped(TrialSource.PRUNED)
    res = evaluator(train)
    ok = res.status is ProbeStatus.OK
    return TrialRecord(number=number, train=train, source=TrialSource.PROBE, status=TrialStatus.of(res.status),
                       tokens_per_s=res.tokens_per_s if ok else 0.0,
                       peak_bytes=max(res.peak_reserved_bytes, res.peak_allocated_bytes) if ok else pred_bytes,
                       feasible=ok and max(res.peak_reserved_bytes, res.peak_allocated_bytes) <= usable)


def _larger_than_an_oom(train: TrainConfig, known: dict[str, TrialRecord]) -> bool:
    """Monotonicity: more micro-batch with every other knob equal cannot need less memory."""
    for r in known.values():
        if r.source is TrialSource.PROBE and r.status is TrialStatus.OOM and \
                train.batch_size >= r.train.batch_size and \
                train.with_(batch_size=r.train.batch_size, grad_accum=r.train.grad_accum) == r.train:
            return True
    return False


def _calibration(known: dict[str, TrialRecord], predicted: dict[str, tuple[int, float]],
                 usable: int | None = None) -> dict[str, float]:
    """measured / predicted for memory (the largest ratio seen: conservative; an OOM of a configuration predicted
    at P under capacity says the ratio is at least capacity / P) and speed (the median)."""
    mem, speed = [], []
    for key, r in known.items():
        if r.source is not TrialSource.PROBE:
            continue
        if r.status is TrialStatus.OK:
            mem.append(r.peak_bytes / predicted[key][0])
            speed.append(r.tokens_per_s / predicted[key][1])
        elif r.status is TrialStatus.OOM and usable:
            mem.append(usable / predicted[key][0] * (1 + 1e-9))
    out: dict[str, float] = {}
    if mem:
        out["memory_ratio"] = max(mem)
    if speed:
        speed.sort()
        out["speed_ratio"] = speed[len(speed) // 2]
    return out


def _distributions(optuna, space: list[TrainConfig]) -> dict[str, object]:  # noqa: ANN001
    values: dict[str, list[object]] = {k: [] for k in KNOBS}
    for t in space:
        for k, v in _params(t).items():
            if v not in values[k]:
                values[k].append(v)
    return {k: optuna.distributions.CategoricalDistribution(v) for k, v in values.items()}


def _tell(study, trial, record: TrialRecord, source: TrialSource) -> None:  # noqa: ANN001
    trial.set_user_attr("source", source.value)  # plain strings in the storage: old studies keep loading
    trial.set_user_attr("status", record.status.value)
    trial.set_user_attr("peak_bytes", record.peak_bytes)
    trial.set_user_attr("train", record.train.to_dict())
    # constraint <= 0 is feasible (Optuna's convention); an OOM or a predicted overflow violates it
    trial.set_user_attr("constraint", 0.0 if record.feasible else 1.0)
    trial.set_constraint("memory", 0.0 if record.feasible else 1.0)
    study.tell(trial, record.tokens_per_s)


def _known(study, by_key: dict[str, TrainConfig]) -> dict[str, TrialRecord]:  # noqa: ANN001
    """Records of finished trials of a resumed study (first occurrence of each configuration)."""
    out: dict[str, TrialRecord] = {}
    for ft in study.trials:
        if ft.state.name != "COMPLETE" or "train" not in ft.user_attrs or \
                ft.user_attrs.get("source") == TrialSource.REPEAT.value:
            continue
        train = train_from_dict(ft.user_attrs["train"])
        key = _key(train)
        if key in by_key and key not in out:
            out[key] = TrialRecord(number=ft.number, train=by_key[key], source=TrialSource(ft.user_attrs["source"]),
                                   status=TrialStatus(ft.user_attrs["status"]), tokens_per_s=float(ft.value or 0.0),
                                   peak_bytes=int(ft.user_attrs["peak_bytes"]),
                                   feasible=ft.user_attrs["constraint"] <= 0)
    return out


def _probes(known: dict[str, TrialRecord]) -> int:
    return sum(1 for r in known.values() if r.source is TrialSource.PROBE)
