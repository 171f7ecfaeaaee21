"""A run's stages as a whole: who learns from whom (checked), and what each stands for in
the run's claims: the reference teacher, the distilled student, its labels-only twin, and
the pairs of models ``summary.json`` compares."""

from __future__ import annotations

from dataclasses import dataclass

from recdistill.ensembles import BASELINE_MEMBERS, EnsembleSpec
from recdistill.external.spec import TeacherSpec
from recdistill.models import TwoTowerSpec
from recdistill.stage import StageSpec

# The roles a model plays, as artifact manifests and segment tables name them.
REFERENCE, STUDENT, SCRATCH = "reference", "student", "scratch"
POPULARITY = "popularity"
# The models every run scores beside its stages: their names are taken.
BASELINES = (POPULARITY, *BASELINE_MEMBERS)


@dataclass(frozen=True)
class Roles:
    """``[roles]``: what the stages stand for in the run's claims.

    ``reference`` is the teacher every model's retention is measured against; ``student`` the
    distilled model the claims are about; ``scratch`` its labels-only twin (the same preset
    trained on labels alone); ``comparisons`` the (model, reference) pairs summary.json
    tests. Unset, they are derived from the stages' teachers (:func:`derive_roles`).
    """

    reference: str = ""
    student: str = ""
    scratch: str | None = None
    comparisons: tuple[tuple[str, str], ...] = ()

    def role_of(self, model: str) -> str | None:
        """``REFERENCE``, ``STUDENT`` or ``SCRATCH``: what ``model`` stands for."""
        roles = {REFERENCE: self.reference, STUDENT: self.student, SCRATCH: self.scratch}
        return next((role for role, name in roles.items() if name == model), None)


def derive_roles(
    stages: tuple[StageSpec, ...],
    ensembles: dict[str, EnsembleSpec],
    given: Roles | None,
    teachers: dict[str, TeacherSpec] | None = None,
) -> Roles:
    """The roles ``given`` sets, the rest derived from who learns from whom.

    The reference is the first teacher from outside the run (``[teachers.*]``) that a stage
    learns from, else the first stage another learns from (itself or inside an ensemble);
    the student the stage at the end of the longest chain of teachers (the last of equals,
    so teacher → intermediate → student ends at the student); its scratch twin the first
    labels-only stage of the student's preset. Compared: the student with the reference and
    its twin, the reference with the twin; every other distilled stage with the reference
    and its own labels-only twin; the reference with the baselines and the student with
    ``ease_recency``; each ensemble with its members, a stage with an ensemble or a teacher
    from outside it learns from, and each teacher from outside with the baselines.
    """
    given = given or Roles()
    teachers = teachers or {}
    taught = [
        member
        for stage in stages
        for source in stage.teachers
        for member in (ensembles[source].members if source in ensembles else (source,))
    ]
    names = [stage.name for stage in stages]
    distilled = [stage for stage in stages if stage.teachers]
    reference = given.reference or next((n for n in [*teachers, *names] if n in taught), names[0])
    depth: dict[str, int] = {}
    for stage in stages:
        sources = [
            member
            for source in stage.teachers
            for member in (ensembles[source].members if source in ensembles else (source,))
        ]
        depth[stage.name] = 1 + max((depth.get(s, 0) for s in sources), default=-1)
    student = given.student or max(reversed(names), key=lambda name: depth[name])

    def twin(name: str) -> str | None:
        model = next(stage.model for stage in stages if stage.name == name)
        return next(
            (
                stage.name
                for stage in stages
                if not stage.teachers
                and stage.model == model
                and stage.name not in (name, reference)
            ),
            None,
        )

    scratch = given.scratch if given.scratch is not None else twin(student)
    pairs = [(student, reference), (student, scratch), (reference, scratch)]
    for stage in distilled:
        if stage.name != student:
            pairs += [(stage.name, reference), (stage.name, twin(stage.name))]
    pairs += [(reference, b) for b in BASELINE_MEMBERS] + [(student, BASELINE_MEMBERS[-1])]
    pairs += [(reference, POPULARITY)]
    pairs += [(name, member) for name, spec in ensembles.items() for member in spec.members]
    pairs += [(s.name, t) for s in stages for t in s.teachers if t in ensembles or t in teachers]
    pairs += [(t, b) for t in teachers for b in BASELINE_MEMBERS]
    derived = tuple(dict.fromkeys((a, b) for a, b in pairs if b is not None and a != b))
    return Roles(reference, student, scratch, given.comparisons or derived)


def check_stages(
    stages: tuple[StageSpec, ...],
    models: dict[str, TwoTowerSpec],
    ensembles: dict[str, EnsembleSpec],
    history_length: int,
    teachers: dict[str, TeacherSpec] | None = None,
) -> None:
    """A stage names an unknown preset or a later teacher, an ensemble a member the run does
    not have, or a stage asks of its model or its teacher what they cannot do."""
    teachers = teachers or {}
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"[stages.*]: stage names repeat: {names}")
    for spec in teachers.values():
        if spec.name in [*names, *BASELINES]:
            raise ValueError(f"{spec.where}: the run already has a model named {spec.name!r}")
    logs = [name for name, spec in teachers.items() if not spec.scorable]
    for spec in ensembles.values():
        where = f"[ensembles.{spec.name}]"
        if spec.name in [*names, *BASELINES, *teachers]:
            raise ValueError(f"{where}: the run already has a model named {spec.name!r}")
        members = [*names, *BASELINE_MEMBERS, *teachers]
        unknown = [m for m in spec.members if m not in members]
        if unknown:
            raise ValueError(
                f"{where}: unknown member(s) {unknown}; members are the run's stages, its "
                f"[teachers.*] and the baselines {list(BASELINE_MEMBERS)}"
            )
        scores_only = [m for m in spec.members if m in logs]
        if scores_only:
            raise ValueError(
                f"{where}: {scores_only} is a log of scores: it cannot score the whole "
                "catalogue an ensemble mixes"
            )
    for name, preset in models.items():
        if preset.is_sequence and preset.max_length > history_length:
            raise ValueError(
                f"[models.{name}] reads max_length = {preset.max_length} items, more than "
                f"[train] history_length = {history_length} keeps"
            )
    trained: set[str] = set()
    for stage in stages:
        where = f"[stages.{stage.name}]"
        if stage.name in BASELINES:
            raise ValueError(f"{where}: {stage.name!r} is a baseline's name")
        if stage.model not in models:
            raise ValueError(f"{where} uses unknown model preset {stage.model!r}")
        preset = models[stage.model]
        if stage.objective == "next_item" and not (preset.is_sequence and preset.readout == "last"):
            raise ValueError(
                f"{where}: the next_item objective needs a sequence model read "
                f"out at its last position; [models.{stage.model}] is not one"
            )
        baselines = [t for t in stage.teachers if t in BASELINE_MEMBERS]
        if baselines:
            raise ValueError(
                f"{where} learns from {baselines}: a baseline teaches only as a "
                "member of an [ensembles.*] table"
            )
        needed = [
            member
            for t in stage.teachers
            for member in (ensembles[t].members if t in ensembles else (t,))
            if member not in BASELINE_MEMBERS and member not in teachers
        ]
        missing = [t for t in dict.fromkeys(needed) if t not in trained]
        if missing:
            raise ValueError(f"{where} learns from {missing}, not trained before it")
        for term in stage.losses:
            if term.fn == "feature_mse" and (term.source in ensembles or term.source in logs):
                what = "the ensemble" if term.source in ensembles else "the log of scores"
                raise ValueError(
                    f"{where}: feature_mse needs tower outputs; {what} {term.source!r} has none"
                )
        if stage.lists is not None and all(t in logs for t in stage.ranked_sources):
            raise ValueError(
                f"{where}: lists are ranked by a teacher over the catalogue; "
                f"{list(stage.ranked_sources)} is a log of scores, which brings its own lists"
            )
        trained.add(stage.name)


def check_roles(
    roles: Roles,
    stages: tuple[StageSpec, ...],
    ensembles: dict[str, EnsembleSpec],
    teachers: dict[str, TeacherSpec] | None = None,
) -> None:
    """A role names a model the run does not have (the reference may be a teacher from
    outside the run)."""
    teachers = teachers or {}
    names = [stage.name for stage in stages]
    models = [*names, *ensembles, *BASELINES, *teachers]
    for role in (REFERENCE, STUDENT, SCRATCH):
        name = getattr(roles, role)
        outside = list(teachers) if role == REFERENCE else []
        if name is not None and name not in [*names, *outside]:
            what = "a stage or teacher" if outside else "a stage"
            raise ValueError(
                f"[roles]: {role} = {name!r} is not {what} of the run {[*names, *outside]}"
            )
    for pair in roles.comparisons:
        unknown = [name for name in pair if name not in models]
        if len(pair) != 2 or unknown:
            raise ValueError(
                f"[roles]: comparisons are [model, reference] pairs of the run's models "
                f"{models}, not {list(pair)}"
            )
