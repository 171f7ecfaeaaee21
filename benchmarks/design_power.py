"""How many users each design needs: interleaving against the A/B test, with and without CUPED.

    .venv/bin/python benchmarks/design_power.py --config configs/ab_interleaving.toml \\
        [--treatment best --baseline teacher] [--artifact NAME=DIR ...] \\
        [--replicates 4] [--experiments 200]

The experiment config gives the world (its ``[simulation]`` and ``[clicks]``), the two
models (by their names in ``[artifacts]``, to which ``--artifact`` adds) and the rule
(``[analysis]``: α, power, margin, pre-period). Users
of the world are simulated ``--replicates`` times over (each time a fresh split, fresh
arrivals, candidates and clicks):

- **A/B**: the two models on a 50 / 50 split, after a pre-period on the baseline (CUPED's
  covariate); the per-user sums of every replicate pooled;
- **interleaving**: every request the team-draft merge of the two, the per-user credited
  clicks pooled.

From the pooled users: each design's estimate of the difference (the A/B's relative CTR
lift, interleaving's relative lift of the clicks credited to the treatment's items), its
per-user spread, and so the users needed, in total, for 80 % power at α (the config's)
to detect that difference, and to show non-inferiority within the margin (the treatment's
CI above −margin) when the difference is what was measured. Each size is then checked by
simulation: ``--experiments`` experiments of that many users, drawn from the pooled users
(users are the unit: a draw is a user's whole experience), and the share that reaches
the verdict. Directions of the two designs' estimates are compared: where they disagree,
the table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from recdistill.ab_spec import ExperimentSpec
from recdistill.abtest.analysis import compare, user_totals
from recdistill.abtest.experiment import load_rankers
from recdistill.abtest.preference import compare_preference, credit_totals
from recdistill.abtest.simulate import simulate
from recdistill.abtest.world import World
from recdistill.config import load_experiment
from recdistill.routing import AB, INTERLEAVING, Arm, Routing

# Sizes past this are stated, not checked by simulation (each check draws this many users
# per experiment).
LARGEST_CHECKED = 400_000


def pair_experiment(
    experiment: ExperimentSpec, treatment: str, baseline: str, design: str, replicate: int
) -> ExperimentSpec:
    """The experiment of the two models alone, under ``design``, one replicate's seed."""
    arms = (Arm(treatment, treatment, 0.5), Arm(baseline, baseline, 0.5))
    return dataclasses.replace(
        experiment,
        routing=Routing(f"power-{replicate}", arms, design),
        simulation=dataclasses.replace(
            experiment.simulation,
            seed=experiment.simulation.seed + replicate,
            latency_requests=0,
        ),
        analysis=dataclasses.replace(
            experiment.analysis, control=baseline, ship=(treatment, baseline), cuped=True
        ),
    )


def pooled_users(
    world: World, experiment: ExperimentSpec, rankers, pair, replicates: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-user sums of every replicate: the A/B's (with ``arm`` and the pre-period's) and
    interleaving's (credited clicks)."""
    ab, interleaved = [], []
    for replicate in range(replicates):
        for design, frames in ((AB, ab), (INTERLEAVING, interleaved)):
            spec = pair_experiment(experiment, *pair, design, replicate)
            log = simulate(world, spec, rankers)
            users = user_totals(log) if design == AB else credit_totals(log, pair)
            frames.append(users.reset_index(drop=True))
    return pd.concat(ab, ignore_index=True), pd.concat(interleaved, ignore_index=True)


def needed(sd: float, lift: float, bar: float, alpha: float, power: float) -> float:
    """Units for a CI at ``1 - alpha`` of a log ratio whose per-unit s.d. is ``sd`` to clear
    ``log(1 + bar)`` with ``power``, when the true lift is ``lift``."""
    distance = abs(np.log1p(lift) - np.log1p(bar))
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float((z * sd / distance) ** 2) if distance > 0 else np.inf


def achieved(draw: Callable[[np.random.Generator], bool], experiments: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([draw(rng) for _ in range(experiments)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--treatment", default="best", help="a model of [artifacts]")
    parser.add_argument("--baseline", default="teacher", help="a model of [artifacts]")
    parser.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="add (or replace) a model of [artifacts], e.g. a sweep candidate exported",
    )
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--experiments", type=int, default=200)
    args = parser.parse_args()

    started = time.perf_counter()
    experiment = load_experiment(args.config)
    added = dict(entry.split("=", 1) for entry in args.artifact)
    experiment = dataclasses.replace(
        experiment,
        artifacts=experiment.artifacts | {name: Path(d) for name, d in added.items()},
    )
    pair = (args.treatment, args.baseline)
    spec = experiment.analysis
    alpha, power, margin = spec.alpha, spec.power, spec.margin
    world = World.load(experiment.simulation, experiment.clicks)
    rankers = load_rankers(pair_experiment(experiment, *pair, AB, 0))
    ab, interleaved = pooled_users(world, experiment, rankers, pair, args.replicates)
    treated, base = ab[ab["arm"] == pair[0]], ab[ab["arm"] == pair[1]]
    level = 1 - alpha

    rows = []
    for cuped in (False, True):
        lift = compare(treated, base, "ctr", level=level, cuped=cuped)
        # relative_sd is one user's in one arm; with N users in all, N / 2 in each arm, the
        # log ratio's variance is 2 * relative_sd**2 / (N / 2): 2 * relative_sd per user.
        sd = 2 * lift.relative_sd

        def ab_draw(users: int, bar: float, cuped=cuped):
            per_arm = int(np.ceil(users / 2))

            def draw(rng: np.random.Generator) -> bool:
                t = treated.iloc[rng.integers(0, len(treated), per_arm)]
                b = base.iloc[rng.integers(0, len(base), per_arm)]
                result = compare(t, b, "ctr", level=level, cuped=cuped)
                return result.ci_low > bar if bar < 0 else result.p_value < alpha

            return draw

        rows.append(
            (
                "A/B" + (" + CUPED" if cuped else ""),
                lift.lift,
                lift.ci_low,
                lift.ci_high,
                sd,
                ab_draw,
            )
        )
    preference = compare_preference(interleaved, level)

    def interleaved_draw(users: int, bar: float):
        users = int(np.ceil(users))

        def draw(rng: np.random.Generator) -> bool:
            result = compare_preference(
                interleaved.iloc[rng.integers(0, len(interleaved), users)], level
            )
            return result.ci_low > bar if bar < 0 else result.p_value < alpha

        return draw

    rows.append(
        (
            "interleaving",
            preference.lift,
            preference.ci_low,
            preference.ci_high,
            preference.relative_sd,
            interleaved_draw,
        )
    )

    world_users = len(world.population.user_ids)
    print(
        f"{args.config}: {args.treatment} vs {args.baseline}, {world_users:,} users × "
        f"{args.replicates} replicates, {experiment.simulation.days} days; α = {alpha:g}, "
        f"power {power:.0%}, margin {margin:.1%}; users are totals (an A/B's both arms)"
    )
    header = (
        f"{'design':<16}{'lift':>9}{'95 % CI':>20}{'detect: users':>15}{'achieved':>10}"
        f"{'non-inferior: users':>21}{'achieved':>10}"
    )
    print(header)
    for name, lift, low, high, sd, make_draw in rows:
        cells = []
        for bar in (0.0, -margin):
            users = needed(sd, lift, bar, alpha, power)
            if bar < 0 and lift <= -margin:
                cells.append(("never", "–"))
                continue
            checked = (
                f"{achieved(make_draw(users, bar), args.experiments, 0):.1%}"
                if users <= LARGEST_CHECKED
                else "–"
            )
            cells.append((f"{users:,.0f}", checked))
        print(
            f"{name:<16}{lift:>+9.2%}{f'[{low:+.2%}, {high:+.2%}]':>20}"
            f"{cells[0][0]:>15}{cells[0][1]:>10}{cells[1][0]:>21}{cells[1][1]:>10}"
        )
    directions = {np.sign(row[1]) for row in rows}
    agreement = (
        "the designs agree in direction"
        if len(directions) == 1
        else "the designs DISAGREE in direction"
    )
    print(
        f"\n{agreement}; interleaving's preference share {preference.share:.2%} "
        f"[{preference.share_low:.2%}, {preference.share_high:.2%}]; users preferring "
        f"{args.treatment} {preference.wins:,}, {args.baseline} {preference.losses:,}, neither "
        f"{preference.ties:,}; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
