"""Configs as frozen, typed trees: parsed from TOML and validated here, once.

A run's config (``recdistill train``) is a :class:`RunConfig`; a sweep's a :class:`SweepConfig`,
built from the same parts; an A/B experiment's an
:class:`~recdistill.ab_spec.ExperimentSpec`. Every error names its TOML table. A
``RunConfig`` can be built in Python and written back to TOML (:meth:`RunConfig.to_toml`): a
run directory holds its config resolved so, every default and role written out.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from recdistill import toml_writer
from recdistill.ab_spec import (
    TABLES,
    AnalysisSpec,
    ClickSpec,
    ExperimentSpec,
    ImpactSpec,
    SimulationSpec,
)
from recdistill.data.prepare import SplitSpec
from recdistill.data.synthetic_world import SyntheticSpec
from recdistill.ensembles import EnsembleSpec
from recdistill.external.spec import TeacherSpec
from recdistill.layout import DEFAULT_HISTORY_LENGTH
from recdistill.models import TwoTowerSpec
from recdistill.quantize import QuantizationSpec
from recdistill.ranked_lists import ListSpec
from recdistill.roles import REFERENCE, STUDENT, Roles, check_roles, check_stages, derive_roles
from recdistill.routing import AB, DESIGNS, INTERLEAVING, Arm, Routing
from recdistill.stage import LossTerm, StageSpec
from recdistill.summary import SelectionSpec
from recdistill.tracking import TrackingSpec

Spec = TypeVar("Spec")
HISTORY_LENGTH = "history_length"
# The [train] keys that are every stage's defaults.
STAGE_DEFAULTS = tuple(
    f.name for f in dataclasses.fields(StageSpec) if f.name not in ("name", "model", "losses")
)
# How each stage of a run starts, before its [stages.*] table.
NO_STAGE = StageSpec(name="", model="", losses=())
EASE_L2 = (100.0, 300.0, 1000.0)
EASE_HALF_LIVES = (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)  # in items of the user's history


@dataclass(frozen=True)
class DataConfig:
    """``[data.synthetic]`` (the generated world) and ``[data.split]``."""

    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    split: SplitSpec = field(default_factory=SplitSpec)


@dataclass(frozen=True)
class TrainDefaults:
    """``[train]``: the history features hold and what every stage starts from (its
    ``valid_metric`` is also the run's, for the baselines and ensembles validation tunes)."""

    history_length: int = DEFAULT_HISTORY_LENGTH
    stage: StageSpec = NO_STAGE

    @property
    def valid_metric(self) -> str:
        return self.stage.valid_metric

    def stage_of(
        self, name: str, model: str, losses: tuple[LossTerm, ...], **table: Any
    ) -> StageSpec:
        """Stage ``name``: these defaults, then ``table``'s keys (as in ``[stages.NAME]``)."""
        return replace(self.stage, name=name, model=model, losses=losses, **table)


@dataclass(frozen=True)
class BaselineGrids:
    """``[baselines.ease] l2`` and ``[baselines.ease_recency] half_life``: the settings
    validation chooses among."""

    ease_l2: tuple[float, ...] = EASE_L2
    half_lives: tuple[float, ...] = EASE_HALF_LIVES

    def __post_init__(self) -> None:
        if not self.ease_l2 or not self.half_lives:
            raise ValueError("[baselines.*]: a baseline's grid is empty")


@dataclass(frozen=True)
class RunConfig:
    """Everything ``recdistill train`` does, typed; build it in Python or :func:`load_run_config`."""

    data: DataConfig = field(default_factory=DataConfig)
    models: dict[str, TwoTowerSpec] = field(default_factory=dict)
    train: TrainDefaults = field(default_factory=TrainDefaults)
    stages: tuple[StageSpec, ...] = ()
    ensembles: dict[str, EnsembleSpec] = field(default_factory=dict)
    # Teachers from outside the run: ``[teachers.*]`` (recdistill/external/spec.py).
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    baselines: BaselineGrids = field(default_factory=BaselineGrids)
    roles: Roles | None = None
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def __post_init__(self) -> None:
        if self.stages:
            check_stages(
                self.stages, self.models, self.ensembles, self.history_length, self.teachers
            )
            roles = derive_roles(self.stages, self.ensembles, self.roles, self.teachers)
            check_roles(roles, self.stages, self.ensembles, self.teachers)
            object.__setattr__(self, "roles", roles)

    @property
    def history_length(self) -> int:
        return self.train.history_length

    def stage(self, name: str) -> StageSpec:
        return next(stage for stage in self.stages if stage.name == name)

    def preset(self, stage: str) -> TwoTowerSpec:
        """The model spec stage ``stage`` trains."""
        return self.models[self.stage(stage).model]

    def to_toml(self) -> str:
        """The config resolved, as TOML that :func:`parse_run_config` reads back equal."""
        return toml_writer.dumps(_run_tables(self))


def load_toml(path: Path | None) -> dict[str, Any]:
    """The parsed TOML at ``path``, or an empty table when no path is given."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config {path}: {error}") from error


def load_run_config(path: Path | None, changes: dict[str, Any] | None = None) -> RunConfig:
    """The run config at ``path`` (a config without ``path``: every default), with the
    tables of ``changes`` (e.g. ``{"models": {"teacher": {"layers": 1}}}``) merged over it."""
    return parse_run_config(_merged(load_toml(path), changes or {}))


def assignments(texts: list[str]) -> dict[str, Any]:
    """``--set`` overrides (``stages.teacher.epochs=5``, ``train.seed=1``) as the nested
    tables :func:`load_run_config` merges over a config: the dotted key names the table and
    the key, the value is read as TOML (a bare word that is not one is a string)."""
    changes: dict[str, Any] = {}
    for text in texts:
        key, equals, value = text.partition("=")
        path = key.strip().split(".")
        if not equals or not all(path):
            raise ValueError(f"--set {text!r}: expected TABLE.KEY=VALUE, e.g. train.epochs=5")
        try:
            parsed = tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            parsed = value
        for name in reversed(path):
            parsed = {name: parsed}
        changes = _merged(changes, parsed)
    return changes


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both else value
    return merged


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    defaults = _train_defaults(raw)
    return RunConfig(
        data=DataConfig(
            synthetic=spec_from(SyntheticSpec, section(raw, "data.synthetic"), "[data.synthetic]"),
            split=spec_from(SplitSpec, section(raw, "data.split"), "[data.split]"),
        ),
        models=_model_presets(raw),
        train=defaults,
        stages=tuple(
            _stage(defaults, name, table) for name, table in section(raw, "stages").items()
        ),
        ensembles={
            name: spec_from(EnsembleSpec, table, f"[ensembles.{name}]", name=name)
            for name, table in section(raw, "ensembles").items()
        },
        teachers=_teacher_specs(raw),
        baselines=BaselineGrids(
            ease_l2=tuple(section(raw, "baselines.ease").get("l2", EASE_L2)),
            half_lives=tuple(
                section(raw, "baselines.ease_recency").get("half_life", EASE_HALF_LIVES)
            ),
        ),
        roles=spec_from(Roles, section(raw, "roles"), "[roles]") if "roles" in raw else None,
        tracking=spec_from(TrackingSpec, section(raw, "tracking"), "[tracking]"),
    )


def _train_defaults(raw: dict[str, Any]) -> TrainDefaults:
    train = dict(section(raw, "train"))
    length = train.pop(HISTORY_LENGTH, DEFAULT_HISTORY_LENGTH)
    return TrainDefaults(
        length, replace(NO_STAGE, **_stage_keys(train, "[train]", (HISTORY_LENGTH,)))
    )


def _model_presets(raw: dict[str, Any]) -> dict[str, TwoTowerSpec]:
    """The ``[models.*]`` specs; a bad one is an error that names its table."""
    presets = {}
    for name, table in section(raw, "models").items():
        where = f"[models.{name}]"
        try:
            presets[name] = spec_from(TwoTowerSpec, table, where)
        except (TypeError, ValueError) as error:
            raise ValueError(str(error) if str(error).startswith(where) else f"{where}: {error}")
    return presets


def _teacher_specs(raw: dict[str, Any]) -> dict[str, TeacherSpec]:
    """The ``[teachers.*]`` specs; each names its ``kind``."""
    specs = {}
    for name, table in section(raw, "teachers").items():
        where = f"[teachers.{name}]"
        if not isinstance(table, dict) or "kind" not in table:
            raise ValueError(f'{where} names no kind (kind = "onnx", "torch", ...)')
        specs[name] = spec_from(TeacherSpec, table, where, name=name)
    return specs


def _loss_terms(terms: list[dict[str, Any]], where: str) -> tuple[LossTerm, ...]:
    """``losses = [{fn, source, weight, **options}, ...]`` as loss terms."""
    parsed = []
    for term in terms:
        term = dict(term)
        fixed = {k: term.pop(k) for k in ("fn", "source", "weight") if k in term}
        try:
            parsed.append(LossTerm(**fixed, options=term))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error
    if not parsed:
        raise ValueError(f"{where} has no losses")
    return tuple(parsed)


def _stage(defaults: TrainDefaults, name: str, table: dict[str, Any]) -> StageSpec:
    where = f"[stages.{name}]"
    table = dict(table)
    losses = _loss_terms(table.pop("losses", []), where)
    if "model" not in table:
        raise ValueError(f"{where} names no model preset (model = ...)")
    model = table.pop("model")
    return defaults.stage_of(name, model, losses, **_stage_keys(table, where))


def _stage_keys(table: dict[str, Any], where: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A stage's settings from ``[train]`` or ``[stages.NAME]`` (``lists`` as a ListSpec)."""
    unknown = sorted(set(table) - set(STAGE_DEFAULTS))
    if unknown:
        valid = sorted([*STAGE_DEFAULTS, *extra])
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {valid}")
    check_types(StageSpec, {k: v for k, v in table.items() if k != "lists"}, where)
    values = _tuples(table)
    if "lists" in values:
        values["lists"] = spec_from(ListSpec, table["lists"], f"{where} lists")
    return values


@dataclass(frozen=True)
class SweepSpec:
    """``[sweep]``: where the teachers come from, what to search and how to measure it."""

    base_run: str = ""
    search: str = "grid"  # "grid": every preset × mix; "random": ``samples`` of them
    samples: int = 0
    seed: int = 0
    min_segment_users: int = 100
    latency_rounds: int = 5
    latency_requests: int = 200  # timed requests per model and round
    # Teacher-ranked (RRD) lists every candidate learns on; unset: the training lists.
    lists: ListSpec | None = None

    def __post_init__(self) -> None:
        if not self.base_run:
            raise ValueError('[sweep] needs base_run = "runs/X", the run whose teachers teach')
        if self.search not in ("grid", "random"):
            raise ValueError(f'[sweep] search = {self.search!r}; use "grid" or "random"')


@dataclass(frozen=True)
class SweepConfig:
    """``recdistill sweep``'s config: ``[sweep]``, the rule (``[selection]``) and the simulated
    experiments it judges by (``[impact]``), the int8 copy (``[quantization]``), and a run
    config's ``[train]`` defaults and ``[models.*]`` presets, each trained with every loss mix
    of ``[mixes]``; ``[tracking]`` as a run config's."""

    sweep: SweepSpec
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    impact: ImpactSpec = field(default_factory=ImpactSpec)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    train: TrainDefaults = field(default_factory=TrainDefaults)
    models: dict[str, TwoTowerSpec] = field(default_factory=dict)
    mixes: dict[str, tuple[LossTerm, ...]] = field(default_factory=dict)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def __post_init__(self) -> None:
        if not self.models or not self.mixes:
            raise ValueError("a sweep config needs [models.*] presets and a [mixes] table")


def load_sweep_config(path: Path) -> SweepConfig:
    raw = load_toml(path)
    sweep = dict(section(raw, "sweep"))
    lists = sweep.pop("lists", None)
    lists = None if lists is None else spec_from(ListSpec, lists, "[sweep] lists")
    return SweepConfig(
        sweep=spec_from(SweepSpec, sweep, "[sweep]", lists=lists),
        selection=spec_from(SelectionSpec, section(raw, "selection"), "[selection]"),
        impact=_impact(section(raw, "impact")),
        quantization=spec_from(QuantizationSpec, section(raw, "quantization"), "[quantization]"),
        train=_train_defaults(raw),
        models=_model_presets(raw),
        mixes={
            name: _loss_terms(terms, f"[mixes] {name}")
            for name, terms in section(raw, "mixes").items()
        },
        tracking=spec_from(TrackingSpec, section(raw, "tracking"), "[tracking]"),
    )


def _impact(table: dict[str, Any]) -> ImpactSpec:
    """``[impact]``: its ``simulation``, ``clicks`` and ``analysis`` tables, each as an
    experiment config's (``simulation.data`` is the sweep's data)."""
    tables = {"simulation": SimulationSpec, "clicks": ClickSpec, "analysis": AnalysisSpec}
    unknown = sorted(set(table) - set(tables))
    if unknown:
        raise ValueError(f"[impact]: unknown table(s) {unknown}; valid tables are {list(tables)}")
    if "data" in table.get("simulation", {}):
        raise ValueError("[impact.simulation]: no data here: the sweep simulates on its --data")
    specs = {
        name: spec_from(
            kind,
            table.get(name, {}),
            f"[impact.{name}]",
            **({"data": ""} if name == "simulation" else {}),
        )
        for name, kind in tables.items()
    }
    return ImpactSpec(**specs)


def load_routing(path: Path) -> Routing:
    """The ``[ab]`` table of an experiment's config: what ``recdistill serve --ab`` reads."""
    return routing_from(section(load_toml(path), "ab"))


def load_experiment(
    path: Path, *, live: bool = False, **simulation_overrides: Any
) -> ExperimentSpec:
    """The experiment of the TOML at ``path``; ``simulation_overrides`` (not None) win.

    Unset, ``[analysis] ship`` is the arm serving a run's student against the arm serving
    its reference teacher, as their artifacts' manifests name their roles. ``live``: for
    analysing a server's logs, which needs neither ``[artifacts]`` nor ``[simulation]``."""
    raw = load_toml(path)
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; valid tables are {list(TABLES)}")
    if "ab" not in raw:
        raise ValueError(f"{path}: no [ab] table (salt and arms)")
    routing = routing_from(section(raw, "ab"))
    artifacts = {name: Path(directory) for name, directory in section(raw, "artifacts").items()}
    for arm in routing.arms:
        if arm.model not in artifacts and not live:
            raise ValueError(
                f"{path}: arm {arm.name!r} serves model {arm.model!r}, which [artifacts] does "
                f"not list (it lists {sorted(artifacts)})"
            )
    simulation_table = section(raw, "simulation")
    if "data" not in simulation_table:
        if not live:
            raise ValueError(f"{path}: [simulation] needs `data`, the data directory")
        simulation_table = {**simulation_table, "data": ""}
    analysis = spec_from(AnalysisSpec, section(raw, "analysis"), "[analysis]")
    if not analysis.ship:
        if any(arm.model not in artifacts for arm in routing.arms):
            raise ValueError(f"{path}: set [analysis] ship = [treatment arm, baseline arm]")
        analysis = replace(analysis, ship=_ship_by_role(path, routing, artifacts))
    arms = [arm.name for arm in routing.arms]
    roles = [] if routing.interleaved else [("control", analysis.control)]
    for role, name in [*roles, *zip(("ship", "ship"), analysis.ship)]:
        if name not in arms:
            raise ValueError(f"{path}: [analysis] {role} arm {name!r} is not an arm of [ab] {arms}")
    return ExperimentSpec(
        routing=routing,
        artifacts=artifacts,
        simulation=spec_from(
            SimulationSpec, simulation_table, "[simulation]", **simulation_overrides
        ),
        clicks=spec_from(ClickSpec, section(raw, "clicks"), "[clicks]"),
        analysis=analysis,
    )


def _ship_by_role(path: Path, routing: Routing, artifacts: dict[str, Path]) -> tuple[str, str]:
    from recdistill.manifest import read_manifest

    arm_of = {read_manifest(artifacts[arm.model]).role: arm.name for arm in routing.arms}
    if STUDENT not in arm_of or REFERENCE not in arm_of:
        raise ValueError(
            f"{path}: no arm serves both a run's student and its reference teacher: "
            "set [analysis] ship = [treatment arm, baseline arm]"
        )
    return arm_of[STUDENT], arm_of[REFERENCE]


def routing_from(table: dict[str, Any], where: str = "[ab]") -> Routing:
    """``{"salt": ..., "arms": {name: {"model": ..., "share": ...}}}`` (TOML ``[ab]``), and
    ``design = "interleaving"`` for two arms interleaved on every request (no shares)."""
    unknown = sorted(set(table) - {"salt", "arms", "design"})
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; valid keys are ['arms', 'design', 'salt']"
        )
    if "salt" not in table or not isinstance(table["salt"], str):
        raise ValueError(f"{where}: give a string salt")
    design = table.get("design", AB)
    if design not in DESIGNS:
        raise ValueError(f"{where}: design must be one of {list(DESIGNS)}, not {design!r}")
    keys = {"model"} if design == INTERLEAVING else {"model", "share"}
    arms = []
    for name, arm in table.get("arms", {}).items():
        if set(arm) != keys:
            needed = (
                "`model` (interleaving shows both arms on every request: no share)"
                if design == INTERLEAVING
                else "`model` and `share`"
            )
            raise ValueError(f"{where}.arms.{name}: give exactly {needed}")
        share = float(arm["share"]) if "share" in keys else 1.0 / len(table["arms"])
        arms.append(Arm(name, str(arm["model"]), share))
    try:
        return Routing(salt=table["salt"], arms=tuple(arms), design=design)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _run_tables(config: RunConfig) -> dict[tuple[str, ...], dict[str, Any]]:
    """The config as TOML tables, by header."""
    tables = {
        ("data", "synthetic"): _fields(config.data.synthetic),
        ("data", "split"): _fields(config.data.split),
        **{("models", name): _fields(spec) for name, spec in config.models.items()},
        ("train",): {HISTORY_LENGTH: config.history_length, **_stage_table(config.train.stage)},
        ("baselines", "ease"): {"l2": config.baselines.ease_l2},
        ("baselines", "ease_recency"): {"half_life": config.baselines.half_lives},
        **{
            ("ensembles", name): _fields(spec, skip=("name",))
            for name, spec in config.ensembles.items()
        },
        **{
            ("teachers", name): _fields(spec, skip=("name",))
            for name, spec in config.teachers.items()
        },
    }
    if config.roles is not None:
        tables["roles",] = _fields(config.roles)
    tables["tracking",] = _fields(config.tracking)
    for stage in config.stages:
        tables["stages", stage.name] = {
            "model": stage.model,
            **_stage_table(stage),
            "losses": [
                {"fn": t.fn, "source": t.source, "weight": t.weight, **t.options}
                for t in stage.losses
            ],
        }
    return tables


def _stage_table(stage: StageSpec) -> dict[str, Any]:
    table = _fields(stage, skip=("name", "model", "losses"))
    if stage.lists is not None:
        table["lists"] = _fields(stage.lists)
    return table


def _fields(spec: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass's fields as TOML values (TOML has no null: a None field is left out)."""
    return {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.name not in skip and getattr(spec, f.name) is not None
    }


def section(raw: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The table at ``dotted`` (e.g. ``"data.split"``), empty when absent."""
    table: Any = raw
    for key in dotted.split("."):
        table = table.get(key, {}) if isinstance(table, dict) else {}
    return table


def spec_from(cls: type[Spec], table: dict[str, Any], where: str, **overrides: Any) -> Spec:
    """Build the dataclass ``cls`` from a config table; ``overrides`` that are not None win.

    Unknown keys are an error that names ``where`` (e.g. ``"[data.split]"``) and the valid keys.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    check_types(cls, table, where)
    values = _tuples(table)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values)
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith("[") else f"{where}: {message}") from error


def check_types(cls: type, table: dict[str, Any], where: str) -> None:
    """Each value of ``table`` against the type its field of ``cls`` declares (an int where a
    float is asked for is a float; TOML arrays are tuples): a one-line error naming ``where``
    and the key. Fields whose type is not a plain scalar, tuple, list or union of them (a
    nested spec, a table of tables) are checked by their own spec."""
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise ValueError(
                f"{where} {key} = {value!r}: expected {_type_name(hint)}, "
                f"not {type(value).__name__}"
            )


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arg) for arg in args)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values())
    if origin is not None or not isinstance(hint, type):
        return True  # Literal, Annotated, ...: the spec checks them itself
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    return True  # a nested spec: built and checked by its own spec_from


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) in (tuple, list):
        return "an array"
    if typing.get_origin(hint) is dict:
        return "a table"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(hint, "None" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def _tuples(table: dict[str, Any]) -> dict[str, Any]:
    return {k: _tuple(v) for k, v in table.items()}


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value
