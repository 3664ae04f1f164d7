"""The ask/tell search loop. It knows nothing of Ray or MLflow: a dispatcher runs
jobs, and observers hear about every finished trial.

Steady state: whenever a worker is idle the loop asks Optuna for a trial (or
promotes a trial to its next fidelity) and submits it; it tells Optuna each
result as it arrives. A failed merge or a NaN score is told as FAIL and the
search goes on. With pruning, a trial is scored on growing fractions of the
samples, reported at each step, and told PRUNED when the pruner says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomerge.search.dispatch import Dispatcher
from evomerge.search.samplers import fidelity_step
from evomerge.search.space import Space
from evomerge.search.worker import Job, JobResult


@dataclass
class Budget:
    trials: int | None = None
    seconds: float | None = None


@dataclass
class TrialRecord:
    """What the loop learned about one finished trial."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL
    params: dict[str, Any]
    recipe: dict[str, Any]
    value: float | None
    values: list[float]
    tasks: dict[str, float]
    merge_seconds: float
    score_seconds: float
    samples: int
    error: str | None = None
    origin: int | None = None  # the trial whose random stream this one uses (itself, or the one it retries)

    @property
    def seed_number(self) -> int:
        return self.number if self.origin is None else self.origin


@dataclass
class SearchStats:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    samples_scored: int = 0
    busy_seconds: float = 0.0
    wall_seconds: float = 0.0
    records: list[TrialRecord] = field(default_factory=list)
    busy_by_node: dict[str, float] = field(default_factory=dict)  # worker seconds per node, when known
    peak_gib: float | None = None  # the most any worker reported holding on its device (JobResult.peak_gib)
    earlier: int = 0  # trials that earlier sessions evaluated (they count towards the budget)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


Observer = Callable[[TrialRecord, SearchStats], None]


@dataclass
class _Flight:
    trial: Any
    params: dict[str, Any]
    recipe: dict[str, Any]
    origin: int
    stage: int = 0
    merge_seconds: float = 0.0
    score_seconds: float = 0.0
    samples: int = 0
    hits: dict[str, list[bool]] | None = None  # per-sample results of the last fidelity scored


class SearchLoop:
    """Runs ask/tell until the budget is spent; ``run`` returns the statistics."""

    def __init__(
        self,
        study,
        space: Space,
        dispatcher: Dispatcher,
        *,
        budget: Budget,
        seed: int,
        fractions: list[float] | None = None,
        observers: list[Observer] | None = None,
    ):
        self.study = study
        self.space = space
        self.dispatcher = dispatcher
        self.budget = budget
        self.seed = seed
        self.fractions = fractions or [1.0]
        self.observers = observers or []
        self.stats = SearchStats()
        self.flights: dict[int, _Flight] = {}
        self.promote: list[int] = []
        self._warming_up = False
        self.scored: dict[str, tuple[int, JobResult]] = {}  # deterministic recipe -> first trial and result
        self.earlier = 0  # trials finished by earlier runs of this study (they count towards the budget)

    # ---- helpers -----------------------------------------------------------
    def _can_ask(self, start: float) -> bool:
        b = self.budget
        asked = self.earlier + self.stats.finished + len(self.flights)
        if self._warming_up and self.flights:
            return False  # the first trial runs alone: trials asked before any completes are random
        if b.trials is not None and asked >= b.trials:
            return False
        return b.seconds is None or time.monotonic() - start < b.seconds

    def _job(self, number: int, flight: _Flight) -> Job:
        seed = trial_seed(self.seed, flight.origin)
        # a promoted trial scores only the samples beyond its last fidelity's
        return Job(number, flight.recipe, seed=seed, fraction=self.fractions[flight.stage], prior=flight.hits)

    def _ask(self) -> None:
        trial = self.study.ask()
        params = self.space.sample(trial)
        recipe = self.space.recipe(params).to_dict()
        flight = _Flight(trial, params, recipe, origin_of(trial))
        self.flights[trial.number] = flight
        key = _recipe_key(recipe)
        earlier = self.scored.get(key) if key is not None else None
        if earlier is not None:  # the same merge was scored: its result, not a second run
            flight.trial.set_user_attr("same_as", earlier[0])
            self._finish(trial.number, "COMPLETE", earlier[1])
            return
        self.dispatcher.submit(self._job(trial.number, flight))

    def _finish(self, number: int, state: str, result: JobResult) -> None:
        from optuna.trial import TrialState

        flight = self.flights.pop(number)
        values = result.values if result.ok else None
        detail = {
            "tasks": result.tasks,
            "merge_seconds": flight.merge_seconds,
            "score_seconds": flight.score_seconds,
            "samples": flight.samples,
        }
        if result.error:
            detail["error"] = result.error[:4000]
        flight.trial.set_user_attr("result", detail)  # in the study before the tell: observers can be replayed
        if state == "COMPLETE":
            self.study.tell(flight.trial, values if len(values or []) > 1 else result.value)
            self.stats.complete += 1
            self._remember(number, flight.recipe, result)
        else:
            self.study.tell(flight.trial, state=TrialState.PRUNED if state == "PRUNED" else TrialState.FAIL)
            if state == "PRUNED":
                self.stats.pruned += 1
            else:
                self.stats.failed += 1
        record = TrialRecord(
            number,
            state,
            flight.params,
            flight.recipe,
            result.value if result.ok else None,
            result.values,
            result.tasks,
            flight.merge_seconds,
            flight.score_seconds,
            flight.samples,
            result.error,
            flight.origin,
        )
        self.stats.records.append(record)
        for observe in self.observers:
            observe(record, self.stats)

    def _remember(self, number: int, recipe: dict[str, Any], result: JobResult) -> None:
        key = _recipe_key(recipe)
        if key is not None:
            self.scored.setdefault(key, (number, result))

    def _handle(self, result: JobResult) -> None:
        flight = self.flights[result.key]
        flight.merge_seconds += result.merge_seconds
        flight.score_seconds += result.score_seconds
        flight.samples += result.samples
        self.stats.samples_scored += result.samples
        self.stats.busy_seconds += result.merge_seconds + result.score_seconds
        if result.peak_gib is not None:
            self.stats.peak_gib = max(self.stats.peak_gib or 0.0, result.peak_gib)
        if result.node is not None:
            busy = self.stats.busy_by_node
            busy[result.node] = busy.get(result.node, 0.0) + result.merge_seconds + result.score_seconds
        if not result.ok:
            self._finish(result.key, "FAIL", result)
            return
        last = flight.stage == len(self.fractions) - 1
        if not last:
            flight.trial.report(result.value, fidelity_step(self.fractions[flight.stage]))
            if flight.trial.should_prune():
                self._finish(result.key, "PRUNED", result)
                return
            flight.stage += 1
            flight.hits = result.per_sample
            self.promote.append(result.key)
            return
        self._finish(result.key, "COMPLETE", result)

    # ---- the loop ------------------------------------------------------------
    def run(self) -> SearchStats:
        from optuna.trial import TrialState

        start = time.monotonic()
        self.earlier = recover_interrupted(self.study, self.space)
        self.stats.earlier = self.earlier
        complete = self.study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
        for trial in complete:
            r = record_from_trial(trial, self.space)  # a resumed run reuses what was scored
            if r.recipe and r.value is not None:
                self._remember(r.number, r.recipe, JobResult(r.number, r.value, r.values, r.tasks))
        self._warming_up = not complete
        try:
            while True:
                while self.dispatcher.idle() > 0 and self.promote:
                    number = self.promote.pop(0)
                    self.dispatcher.submit(self._job(number, self.flights[number]))
                while self.dispatcher.idle() > 0 and self._can_ask(start):
                    self._ask()
                if not self.flights:
                    break
                for result in self.dispatcher.wait(timeout=5.0):
                    self._handle(result)
                    self._warming_up = self._warming_up and self.stats.complete == 0
        finally:
            self.stats.wall_seconds = time.monotonic() - start
        return self.stats


def _recipe_key(recipe: dict[str, Any]) -> str | None:
    """A key for a recipe whose merge is deterministic (its result depends on nothing
    but the recipe: no random sparsifier, whose draw the trial seed sets), else None.
    Spaces with discrete decodings, such as layer stacks, map many points to one
    recipe; CMA-ES near its mean proposes the same stack again and again."""
    from evomerge.errors import EvomergeError
    from evomerge.operators.moe_config import PROMPTLESS, is_moe
    from evomerge.operators.registry import get_operator

    if is_moe(recipe):  # random gates are drawn from the trial seed
        return None if recipe.get("gate_mode") in PROMPTLESS else json.dumps(recipe, sort_keys=True, default=str)
    try:
        if get_operator(str(recipe.get("merge_method", "passthrough"))).random:
            return None
    except EvomergeError:  # an unknown method: the worker will report it
        return None
    return json.dumps(recipe, sort_keys=True, default=str)


MAX_INTERRUPTIONS = 3  # a parameter set interrupted this often is not retried again


def is_interrupted(trial) -> bool:
    """A trial that a crash cut short: told FAIL on resume (or by an older version, a
    FAIL that never stored a result). It does not count towards the budget."""
    if trial.state.name != "FAIL":
        return False
    return bool(trial.user_attrs.get("interrupted")) or "result" not in trial.user_attrs


def recover_interrupted(study, space: Space) -> int:
    """Tell FAIL the trials an interrupted run left RUNNING, make sure each interrupted
    parameter set has a retry queued, and return how many trials count towards the
    budget: the evaluated ones (complete, pruned, or failed on their own), never the
    interrupted ones, whose retries run in their place.

    Safe to interrupt at any point and run again: the retry is queued before the
    original is told FAIL, and an interrupted trial whose parameter set already has a
    later trial (queued, running or finished) gets no second one. A trial killed while
    its parameters were drawn (after ``ask``, before the last suggestion) holds none
    or only some: it was never dispatched, so nothing is repeated and the sampler
    proposes afresh. A parameter set interrupted ``MAX_INTERRUPTIONS`` times (a
    candidate that takes its run down each time) is not queued again."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    later: dict[int, int] = {}  # origin -> the highest trial number with that origin
    cut: dict[int, int] = {}  # origin -> how many of its trials were interrupted
    for t in trials:
        origin = origin_of(t)
        later[origin] = max(later.get(origin, -1), t.number)
        if t.state == TrialState.RUNNING or is_interrupted(t):
            cut[origin] = cut.get(origin, 0) + 1
    counted = 0
    for t in trials:
        origin = origin_of(t)
        if t.state == TrialState.RUNNING or is_interrupted(t):
            retried = later[origin] > t.number
            if not retried and space.complete(t.params) and cut[origin] < MAX_INTERRUPTIONS:
                study.enqueue_trial(t.params, user_attrs={"retry_of": origin}, skip_if_exists=False)
            if t.state == TrialState.RUNNING:
                study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                study.tell(t.number, state=TrialState.FAIL)
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            counted += 1
    return counted


def record_from_trial(trial, space: Space) -> TrialRecord:
    """A finished trial of the study as the loop reported it (for replaying observers
    and for runs resumed after a crash). A FAIL without a stored result was interrupted."""
    detail = trial.user_attrs.get("result", {})
    state = {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED"}.get(trial.state.name, "FAIL")
    values = list(trial.values or [])
    value = (values[0] if len(values) == 1 else sum(values) / len(values)) if values else None
    error = detail.get("error") or ("interrupted (the run was killed)" if is_interrupted(trial) else None)
    return TrialRecord(
        trial.number,
        state,
        dict(trial.params),
        space.recipe(trial.params).to_dict() if space.complete(trial.params) else {},
        value,
        values,
        dict(detail.get("tasks", {})),
        float(detail.get("merge_seconds", 0.0)),
        float(detail.get("score_seconds", 0.0)),
        int(detail.get("samples", 0)),
        error,
        origin_of(trial),
    )


def origin_of(trial) -> int:
    """The trial number whose random stream a trial uses: a retry repeats the trial it retries."""
    return int(trial.user_attrs.get("retry_of", trial.number))


def trial_seed(seed: int, number: int) -> int:
    """The random stream of a trial derives from the experiment seed and the trial number."""
    return (seed * 1_000_003 + number) & 0x7FFFFFFF
