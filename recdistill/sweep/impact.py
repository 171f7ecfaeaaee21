"""Each candidate against the teacher on simulated business impact (``[impact]``).

The world is the simulator's (:mod:`recdistill.abtest.world`) on the sweep's data, its truth
fitted before the test split (a choice must not read it): the synthetic generator's own
truth, or EASE on train and validation. Every candidate within the latency budget is
interleaved with the base run's reference teacher on every request
(:mod:`recdistill.abtest.preference`); the finalists (:func:`recdistill.sweep.selection.finalists`)
also take an A/B test, 50 / 50 after a pre-period on the teacher (CUPED). Every candidate meets
the same users, requests, candidates and click draws (one seed), so their differences are
theirs, not the simulation's; the teacher's scores of those requests are computed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys

import numpy as np

from recdistill.ab_spec import ExperimentSpec
from recdistill.abtest.analysis import analyse, non_inferiority
from recdistill.abtest.preference import compare_preference, credit_totals
from recdistill.abtest.simulate import simulate
from recdistill.abtest.world import World
from recdistill.online import OnlineRanker
from recdistill.routing import AB, INTERLEAVING, Arm, Routing
from recdistill.summary import AbImpact, CandidateResult, SimulatedImpact
from recdistill.sweep.bench import Bench
from recdistill.sweep.latency import candidate_ranker
from recdistill.sweep.selection import finalists, within_budget


class RememberedScores:
    """A ranker whose scores of a batch of lists are computed once: every candidate's
    experiment asks the teacher about the same requests."""

    def __init__(self, ranker: OnlineRanker) -> None:
        self.ranker = ranker
        self.name, self.version = ranker.name, ranker.version
        self.scores: dict[str, np.ndarray] = {}

    def score_lists(self, user_ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        key = hashlib.sha256(np.ascontiguousarray(user_ids).tobytes())
        key.update(np.ascontiguousarray(candidates).tobytes())
        digest = key.hexdigest()
        if digest not in self.scores:
            self.scores[digest] = self.ranker.score_lists(user_ids, candidates)
        return self.scores[digest]


class Impact:
    """The sweep's simulated experiments of a candidate against the reference teacher."""

    def __init__(self, bench: Bench) -> None:
        plan = bench.plan
        self.spec = plan.impact
        self.reference = plan.reference
        self.world = World.load(self.spec.simulation, self.spec.clicks, before_test=True)
        teacher = bench.ranker(
            self.reference, bench.reference_model, bench.reference_model.parameter_count()
        )
        self.teacher = RememberedScores(teacher)

    def experiment(self, name: str, design: str) -> ExperimentSpec:
        arms = (Arm(name, name, 0.5), Arm(self.reference, self.reference, 0.5))
        return ExperimentSpec(
            routing=Routing("sweep-impact", arms, design),
            artifacts={},
            simulation=dataclasses.replace(self.spec.simulation, latency_requests=0),
            clicks=self.spec.clicks,
            analysis=dataclasses.replace(
                self.spec.analysis, control=self.reference, ship=(name, self.reference)
            ),
        )

    def interleave(self, name: str, ranker: OnlineRanker) -> SimulatedImpact:
        experiment = self.experiment(name, INTERLEAVING)
        log = simulate(self.world, experiment, {name: ranker, self.reference: self.teacher})
        users = credit_totals(log, (name, self.reference))
        preference = compare_preference(users, 1 - self.spec.analysis.alpha)
        return SimulatedImpact(
            users=preference.users,
            wins=preference.wins,
            losses=preference.losses,
            ties=preference.ties,
            share=preference.share,
            share_ci=[preference.share_low, preference.share_high],
            lift=preference.lift,
            lift_ci=[preference.ci_low, preference.ci_high],
            p_value=preference.p_value,
            standing=non_inferiority(
                preference.ci_low, preference.ci_high, self.spec.analysis.margin
            ),
        )

    def ab_test(self, name: str, ranker: OnlineRanker) -> AbImpact:
        experiment = self.experiment(name, AB)
        log = simulate(self.world, experiment, {name: ranker, self.reference: self.teacher})
        lifts = analyse(log, experiment, []).lifts
        row = lifts[lifts["metric"] == experiment.analysis.metric].iloc[0]
        return AbImpact(
            users=[int(row["treatment_users"]), int(row["baseline_users"])],
            lift=float(row["lift"]),
            lift_ci=[float(row["ci_low"]), float(row["ci_high"])],
            p_value=float(row["p_value"]),
            mde=float(row["mde"]),
            standing=non_inferiority(row["ci_low"], row["ci_high"], self.spec.analysis.margin),
        )


def measure_impact(bench: Bench, results: list[CandidateResult]) -> list[CandidateResult]:
    """``results`` with the impact of every candidate within the latency budget: its
    interleaving with the teacher, and the finalists' A/B tests."""
    plan = bench.plan
    impact = Impact(bench)
    by_name = {c.name: c for c in plan.candidates}
    rankers = {}
    measured = []
    for result in results:
        if within_budget(result, plan.selection):
            rankers[result.name] = candidate_ranker(
                bench, by_name[result.name], "float", result.params
            )
            interleaved = impact.interleave(result.name, rankers[result.name])
            result = dataclasses.replace(result, impact=interleaved)
            _announce(result)
        else:
            result = dataclasses.replace(result, impact=None)
        measured.append(result)
    chosen_few = {r.name for r in finalists(measured, plan.selection)}
    for index, result in enumerate(measured):
        if result.name in chosen_few:
            ab = impact.ab_test(result.name, rankers[result.name])
            measured[index] = dataclasses.replace(
                result, impact=dataclasses.replace(result.impact, ab=ab)
            )
    return measured


def _announce(result: CandidateResult) -> None:
    impact = result.impact
    print(
        f"{result.name}: interleaved with the teacher, preference share {impact.share:.2%}, "
        f"clicks {impact.lift:+.2%} [{impact.lift_ci[0]:+.2%}, {impact.lift_ci[1]:+.2%}] "
        f"({impact.standing})",
        file=sys.stderr,
    )
