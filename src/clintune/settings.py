"""Typed settings for the parts of the config that clintune itself reads (method, pairs,
reference, trainer, eval, stages), checked as a whole before any model or data is loaded.

A misspelt choice must not surface after an SFT stage, on-policy sampling and a reference pass
have run. ``settings_from(cfg)`` reads the composed config into these dataclasses and reports
every problem at once, one ``error:`` line each, naming the key, the value and what is allowed.
The YAML files in ``conf/`` hold the defaults; the dataclasses hold none of their own, so a
key missing from the config is an error rather than a second, silent default.

Only the standard library and omegaconf are imported here: the check runs before torch and
Lightning are imported, within a second or two of start-up."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from clintune.errors import UserError

MethodKind = Literal["none", "sft", "dpo", "orpo", "simpo", "kto"]
SaveChoice = Literal["best", "last", "best_metric"]
ReferenceMode = Literal["precompute", "adapter_disabled", "copy"]
PairSource = Literal["auto", "data", "label", "on_policy"]
UnpairedSource = Literal["auto", "data", "pairs"]
DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
Accelerator = Literal["cpu", "gpu", "cuda", "mps", "auto"]
DType = Literal["float32", "bfloat16", "float16"]
# Lightning 2.6's accepted values (lightning.fabric.connector._PRECISION_INPUT).
AnswerType = Literal["label", "letter", "text"]
CustomMetric = Literal["accuracy", "f1_macro", "exact_match", "rougeL"]
Precision = Literal[
    "64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16,
    "bf16-mixed", "bf16", "16-true", "bf16-true", "transformer-engine",
    "transformer-engine-float16",
]  # fmt: skip


class ConfigError(UserError):
    """Every problem of a config, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _minimum(value: float) -> dict[str, float]:
    return {">=": value}


def _positive() -> dict[str, float]:
    return {">": 0}


def _between(low: float, high: float) -> dict[str, float]:
    return {">=": low, "<=": high}


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = dataclasses.field(metadata=_minimum(1))
    max_steps: int | None = dataclasses.field(metadata=_minimum(1))
    batch_size: int = dataclasses.field(metadata=_minimum(1))
    eval_batch_size: int = dataclasses.field(metadata=_minimum(1))
    accumulate_grad_batches: int = dataclasses.field(metadata=_minimum(1))
    gradient_clip_val: float | None = dataclasses.field(metadata=_minimum(0))
    # null: once per epoch; a float is a fraction of an epoch, an int a number of steps
    val_check_interval: int | float | None = dataclasses.field(metadata=_positive())
    # Batches of similar lengths (less padding): sort within buckets of this many global batches.
    group_by_length: bool
    length_bucket_batches: int = dataclasses.field(metadata=_minimum(1))


@dataclass(frozen=True)
class SFTModuleSettings:
    _target_: str
    learning_rate: float = dataclasses.field(metadata=_positive())
    weight_decay: float = dataclasses.field(metadata=_minimum(0))
    warmup_ratio: float = dataclasses.field(metadata=_between(0, 1))
    # Positions whose LM-head logits exist at once (log-probs are computed in chunks).
    logits_chunk_size: int = dataclasses.field(metadata=_minimum(1))


@dataclass(frozen=True)
class DPOModuleSettings(SFTModuleSettings):
    beta: float = dataclasses.field(metadata=_positive())
    loss_type: DPOLossType
    label_smoothing: float = dataclasses.field(metadata={">=": 0, "<": 0.5})
    # RPO: weight of the chosen answer's NLL added to the DPO loss (0: plain DPO)
    nll_alpha: float = dataclasses.field(metadata=_minimum(0))


@dataclass(frozen=True)
class ORPOModuleSettings(SFTModuleSettings):
    beta: float = dataclasses.field(metadata=_positive())  # the ORPO paper's lambda


@dataclass(frozen=True)
class SimPOModuleSettings(SFTModuleSettings):
    beta: float = dataclasses.field(metadata=_positive())
    gamma: float = dataclasses.field(metadata=_minimum(0))  # target reward margin
    label_smoothing: float = dataclasses.field(metadata={">=": 0, "<": 0.5})


@dataclass(frozen=True)
class KTOModuleSettings(SFTModuleSettings):
    beta: float = dataclasses.field(metadata=_positive())
    desirable_weight: float = dataclasses.field(metadata=_positive())
    undesirable_weight: float = dataclasses.field(metadata=_positive())


@dataclass(frozen=True)
class UnpairedSettings:
    """Where KTO's unpaired examples come from: ``data`` (records with a ``completion`` and a
    ``label_field`` of desirable/undesirable), ``pairs`` (each preference pair's chosen answer
    desirable, its rejected one undesirable), or ``auto`` (data where a record has
    feedback, else pairs)."""

    source: UnpairedSource
    label_field: str


@dataclass(frozen=True)
class PairSettings:
    source: PairSource
    seed: int
    samples_per_example: int = dataclasses.field(metadata=_minimum(1))
    max_pairs_per_example: int = dataclasses.field(metadata=_minimum(1))
    temperature: float = dataclasses.field(metadata=_positive())


@dataclass(frozen=True)
class SFTSettings:
    name: str
    kind: Literal["sft"]
    module: SFTModuleSettings
    train: TrainSettings
    save: SaveChoice


class _PreferenceMethod:
    """What the stages ask of every preference method, whichever keys it has."""

    @property
    def sft_stage(self) -> SFTSettings | None:
        """The SFT stage run first, if the method has one."""
        return getattr(self, "sft", None)

    @property
    def reference_mode(self) -> str | None:
        """How the reference log-probs are obtained; None for a reference-free method."""
        return getattr(self, "reference", None)


@dataclass(frozen=True)
class DPOSettings(_PreferenceMethod):
    name: str
    kind: Literal["dpo"]
    sft: SFTSettings | None
    init_from: str | None
    share_prompt: bool
    reference: ReferenceMode
    pairs: PairSettings
    module: DPOModuleSettings
    train: TrainSettings
    save: SaveChoice


@dataclass(frozen=True)
class ORPOSettings(_PreferenceMethod):
    """One stage from the base model (ORPO folds SFT into its loss): no SFT stage, no
    reference model."""

    name: str
    kind: Literal["orpo"]
    init_from: str | None
    share_prompt: bool
    pairs: PairSettings
    module: ORPOModuleSettings
    train: TrainSettings
    save: SaveChoice


@dataclass(frozen=True)
class SimPOSettings(_PreferenceMethod):
    """After the SFT stage, with no reference model."""

    name: str
    kind: Literal["simpo"]
    sft: SFTSettings | None
    init_from: str | None
    share_prompt: bool
    pairs: PairSettings
    module: SimPOModuleSettings
    train: TrainSettings
    save: SaveChoice


@dataclass(frozen=True)
class KTOSettings(_PreferenceMethod):
    """After the SFT stage, on unpaired examples; ``pairs`` says how pairs are built when
    the unpaired examples are derived from them."""

    name: str
    kind: Literal["kto"]
    sft: SFTSettings | None
    init_from: str | None
    share_prompt: bool
    reference: ReferenceMode
    pairs: PairSettings
    unpaired: UnpairedSettings
    module: KTOModuleSettings
    train: TrainSettings
    save: SaveChoice


PreferenceSettings = DPOSettings | ORPOSettings | SimPOSettings | KTOSettings
PREFERENCE_SETTINGS = (DPOSettings, ORPOSettings, SimPOSettings, KTOSettings)


@dataclass(frozen=True)
class BaseSettings:
    name: str
    kind: Literal["none"]
    module: None


MethodSettings = BaseSettings | SFTSettings | PreferenceSettings
_METHOD_CLASSES: dict[str, type] = {
    "none": BaseSettings,
    "sft": SFTSettings,
    "dpo": DPOSettings,
    "orpo": ORPOSettings,
    "simpo": SimPOSettings,
    "kto": KTOSettings,
}
#: The keys an experiment file (conf/experiment/*.yaml) sets under ``method:`` for every method
#: of its grid, whether that method reads them or not: demo_grid shortens ``method.train`` and
#: the SFT stage ``method.sft`` of ``method=base,sft,dpo,...``, qlora_llama3 sizes both. Only
#: these may ride on a method that does not use them (base has neither, sft and orpo have no
#: SFT stage); any other key of another method is an error. tests/unit/test_settings.py holds
#: this set to exactly the keys the shipped experiments set.
GRID_METHOD_KEYS = frozenset({"sft", "train"})


def _kinds_using(key: str) -> list[str]:
    """The method kinds whose settings have ``key`` at the top of ``method``."""
    return [
        name
        for name, kind in _METHOD_CLASSES.items()
        if key in {field.name for field in dataclasses.fields(kind)}
    ]


@dataclass(frozen=True)
class BootstrapSettings:
    samples: int = dataclasses.field(metadata=_minimum(0))
    confidence: float = dataclasses.field(metadata={">": 0, "<": 1})
    seed: int


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = dataclasses.field(metadata=_minimum(1))
    limit: int | None = dataclasses.field(metadata=_minimum(1))
    progress_bar: bool
    bootstrap: BootstrapSettings


@dataclass(frozen=True)
class StageSettings:
    reuse: bool
    resume: bool


@dataclass(frozen=True)
class CheckpointSettings:
    every_n_steps: int = dataclasses.field(metadata=_minimum(0))


@dataclass(frozen=True)
class SubsampleSettings:
    train: int | None = dataclasses.field(metadata=_minimum(1))
    val: int | None = dataclasses.field(metadata=_minimum(1))


@dataclass(frozen=True)
class SweepSettings:
    name: str | None
    resume: bool


#: ``trainer.strategy._target_`` of the sharded presets (trainer=fsdp, fsdp_cpu).
FSDP_STRATEGY = "clintune.sharding.fsdp_strategy"


@dataclass(frozen=True)
class FSDPSettings:
    """``trainer.strategy`` of ``trainer=fsdp``/``fsdp_cpu``: FSDP2 through Lightning's
    ModelParallelStrategy, each decoder layer one unit, then the root."""

    # Processes the parameters are sharded over: auto = every process of the job.
    data_parallel_size: int | Literal["auto"] = dataclasses.field(metadata=_minimum(1))
    tensor_parallel_size: Literal[1]  # no tensor-parallel plan (yet): sharding only
    # Gathered parameters are cast to param_dtype for compute (null: as stored); gradients
    # are reduced in reduce_dtype; the sharded copy of trainable parameters, which the
    # optimiser updates, is kept in trainable_dtype (frozen ones stay in model.dtype).
    param_dtype: DType | None
    reduce_dtype: DType | None
    trainable_dtype: DType
    activation_checkpointing: bool  # recompute each decoder layer in backward
    reshard_after_forward: bool  # free gathered layers after forward, gather again in backward


@dataclass(frozen=True)
class TrainerSettings:
    """The keys clintune reads; the node goes to Lightning's Trainer whole (other keys too)."""

    accelerator: Accelerator
    devices: int | Literal["auto"] | list[int] = dataclasses.field(metadata=_minimum(1))
    precision: Precision
    # More than one is refused by clintune.distributed with its own message (one job, one
    # machine); the default is Lightning's.
    num_nodes: int = dataclasses.field(default=1, metadata=_minimum(1))
    # Read from trainer.strategy when it names FSDP_STRATEGY; None for any other strategy.
    sharding: FSDPSettings | None = None


@dataclass(frozen=True)
class Settings:
    """What train.py reads besides the model and task configs (which are instantiated)."""

    seed: int
    method: MethodSettings
    trainer: TrainerSettings
    eval: EvalSettings
    stages: StageSettings | None = None
    checkpoint: CheckpointSettings | None = None
    subsample: SubsampleSettings | None = None
    sweep: SweepSettings | None = None


# ---- task=custom: a task defined by its config alone (clintune.tasks.custom) ----------------

CUSTOM_TASK_TARGET = "clintune.tasks.custom.CustomTask"
#: The metrics each answer type can have; the first ones are the default.
METRICS_FOR_TYPE: dict[str, tuple[str, ...]] = {
    "label": ("f1_macro", "accuracy", "exact_match"),
    "letter": ("accuracy", "f1_macro", "exact_match"),
    "text": ("rougeL", "exact_match"),
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "label": ("f1_macro", "accuracy"),
    "letter": ("accuracy",),
    "text": ("rougeL", "exact_match"),
}
# Record fields with a meaning of their own, which an answer must not reuse.
_RESERVED_FIELDS = frozenset({"id", "messages", "rejected"})
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class AnswerSettings:
    """One answer field of a custom task."""

    type: AnswerType
    labels: list[str] | None = None  # label: the allowed values
    letters: list[str] | None = None  # letter: the option letters (default A–D)
    options_field: str | None = None  # letter: the record's {letter: text} field ("options")
    metrics: list[CustomMetric] | None = None  # default DEFAULT_METRICS[type]

    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metrics) if self.metrics else DEFAULT_METRICS[self.type]

    def label_set(self) -> list[str]:
        """The classes its macro-F1 runs over: the labels, or the option letters."""
        if self.type == "label":
            return list(self.labels or [])
        return list(self.letters or ("A", "B", "C", "D")) if self.type == "letter" else []


@dataclass(frozen=True)
class CustomTaskSettings:
    answers: dict[str, AnswerSettings]
    prompt: str | None = None  # a Jinja template over the record's fields; None: messages
    headline: str | None = None  # a metric key; None: the first answer's first metric
    correct_rouge_l: float = dataclasses.field(default=0.5, metadata=_between(0, 1))

    def metric_keys(self) -> list[str]:
        """The task's metric keys (without ``test/``), headline candidates in order: plain
        names for one answer, ``<field>_<metric>`` for several (then ``exact_match`` too,
        every answer right)."""
        several = len(self.answers) > 1
        keys = [
            f"{name}_{metric}" if several else metric
            for name, answer in self.answers.items()
            for metric in answer.metric_names()
        ]
        return [*keys, "exact_match"] if several and "exact_match" not in keys else keys

    def headline_metric(self) -> str:
        return self.headline or self.metric_keys()[0]


def _custom_task_problems(checker: _Checker, settings: CustomTaskSettings) -> None:
    if not settings.answers:
        checker.problems.append("task.answers is empty: name at least one answer field")
    all_labels: dict[str, str] = {}
    for name, answer in settings.answers.items():
        key = f"task.answers.{name}"
        if not _FIELD_NAME.match(name) or name in _RESERVED_FIELDS:
            checker.problems.append(
                f"{key}: an answer field must be a plain name other than "
                f"{sorted(_RESERVED_FIELDS)}, got {name!r}"
            )
        for metric in answer.metric_names():
            if metric not in METRICS_FOR_TYPE[answer.type]:
                checker.problems.append(
                    f"{key}.metrics: {metric!r} does not apply to a {answer.type} answer: "
                    f"expected some of {list(METRICS_FOR_TYPE[answer.type])}"
                )
        if answer.type == "label":
            labels = answer.labels or []
            if len({label.lower() for label in labels}) < 2:
                checker.problems.append(f"{key}.labels: a label answer needs two or more labels")
            for label in labels:
                if label.lower() in all_labels and all_labels[label.lower()] != name:
                    checker.problems.append(
                        f"{key}.labels: {label!r} is also a label of answer "
                        f"'{all_labels[label.lower()]}', so an answer naming it is ambiguous"
                    )
                all_labels[label.lower()] = name
        elif answer.labels is not None:
            checker.problems.append(f"{key}.labels: only a label answer has labels")
        if answer.type == "letter":
            letters = answer.label_set()
            if len(set(letters)) < 2 or not all(len(x) == 1 and x.isalpha() for x in letters):
                checker.problems.append(
                    f"{key}.letters: expected two or more distinct single letters, got {letters}"
                )
        elif answer.letters is not None or answer.options_field is not None:
            checker.problems.append(f"{key}: only a letter answer has letters and options_field")
    if len(settings.answers) > 1 and any(a.type == "text" for a in settings.answers.values()):
        checker.problems.append(
            "task.answers: a free-text answer must be the only answer (it cannot be told apart "
            "from the next answer's key in one output)"
        )
    if settings.headline is not None and settings.headline not in settings.metric_keys():
        checker.fail("task.headline", settings.headline, f"one of {settings.metric_keys()}")
    if settings.prompt is not None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().parse(settings.prompt)
        except jinja2.TemplateSyntaxError as error:
            checker.problems.append(
                f"task.prompt: not a valid Jinja template: {error.message} (line {error.lineno})"
            )


def custom_task_settings(task: Any) -> CustomTaskSettings:
    """The typed settings of a ``task=custom`` config; raises ``ConfigError`` with every
    problem (the type of each key, the metrics an answer type allows, labels, the template)."""
    checker = _Checker()
    settings = _read_custom_task(checker, task)
    if checker.problems:
        raise ConfigError(checker.problems)
    assert settings is not None
    return settings


def _read_custom_task(checker: _Checker, task: Any) -> CustomTaskSettings | None:
    if isinstance(task, DictConfig) and OmegaConf.is_missing(task, "answers"):
        checker.problems.append(
            "task.answers is missing: name each answer field and its type, e.g. "
            "task.answers={label: {type: label, labels: [yes, no]}} (conf/task/custom.yaml)"
        )
        return None
    answers_node = task.get("answers") if isinstance(task, DictConfig | dict) else None
    if not isinstance(answers_node, DictConfig | dict):
        checker.fail("task.answers", answers_node, "a mapping of answer field → its settings")
        return None
    answers = {
        str(name): checker.node(AnswerSettings, value, f"task.answers.{name}")
        for name, value in answers_node.items()
    }
    values: dict[str, Any] = {}
    for field in dataclasses.fields(CustomTaskSettings):
        if field.name == "answers":
            continue
        kind = get_type_hints(CustomTaskSettings)[field.name]
        if field.name in task:
            values[field.name] = checker.read(
                kind, task.get(field.name), f"task.{field.name}", field.metadata
            )
        elif field.default is dataclasses.MISSING:
            checker.problems.append(f"task.{field.name} is missing: expected {_type_name(kind)}")
            return None
    if checker.problems:
        return None
    settings = CustomTaskSettings(answers=answers, **values)
    _custom_task_problems(checker, settings)
    return settings


# Nodes whose every key is ours: an unknown key there is a typo. The trainer node is passed
# to Lightning as a whole, so its other keys are Lightning's to check.
_OPEN_NODES = frozenset({"trainer"})


def _type_name(kind: Any) -> str:
    origin = get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(kind))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(kind))
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, "null" if kind is type(None) else getattr(kind, "__name__", str(kind))
    )


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, key: str, value: Any, expected: str) -> None:
        shown = (
            OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
        )
        self.problems.append(f"{key}={shown!r} is not allowed: expected {expected}")

    def read(self, kind: Any, value: Any, key: str, metadata: Any = None) -> Any:
        """``value`` as ``kind``; on a problem, records it and returns None."""
        origin = get_origin(kind)
        if origin in (Union, types.UnionType):
            options = get_args(kind)
            if value is None and type(None) in options:
                return None
            for option in options:
                if option is type(None):
                    continue
                if _fits(option, value):
                    return self.read(option, value, key, metadata)
            self.fail(key, value, _type_name(kind))
            return None
        if origin is Literal:
            if value not in get_args(kind) or isinstance(value, bool):
                close = difflib.get_close_matches(str(value), [str(c) for c in get_args(kind)], 1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(key, value, _type_name(kind) + hint)
            return value
        if origin is list:
            if not isinstance(value, ListConfig | list):
                self.fail(key, value, "a list")
                return None
            return [
                self.read(get_args(kind)[0], item, f"{key}[{i}]") for i, item in enumerate(value)
            ]
        if dataclasses.is_dataclass(kind):
            return self.node(kind, value, key)
        if not _fits(kind, value):
            self.fail(key, value, _type_name(kind))
            return None
        if metadata and isinstance(value, int | float) and not isinstance(value, bool):
            self._check_range(key, value, metadata)
        return float(value) if kind is float else value

    def _check_range(self, key: str, value: float, bounds: Any) -> None:
        tests = {
            ">": lambda bound: value > bound,
            ">=": lambda bound: value >= bound,
            "<": lambda bound: value < bound,
            "<=": lambda bound: value <= bound,
        }
        if not all(tests[op](bound) for op, bound in bounds.items()):
            self.fail(key, value, " and ".join(f"{op} {bound}" for op, bound in bounds.items()))

    def node(self, kind: type, value: Any, key: str) -> Any:
        if not isinstance(value, DictConfig | dict):
            self.fail(key, value, "a mapping")
            return None
        hints = get_type_hints(kind)
        fields = {field.name: field for field in dataclasses.fields(kind)}
        if key.split(".")[-1] not in _OPEN_NODES:
            is_method = kind in _METHOD_CLASSES.values()
            # An experiment sets method.train/method.sft for every method of its grid.
            tolerated: set[str] = set(GRID_METHOD_KEYS) if is_method else set()
            if kind is FSDPSettings:
                tolerated = {"_target_"}
            for unknown in sorted(set(value) - set(fields) - tolerated):
                users = _kinds_using(str(unknown)) if is_method else []
                if users:  # another method's key: it would be silently ignored here
                    name, own = value.get("name"), value.get("kind")
                    of_kind = "" if name == own else f" (kind {own})"
                    self.problems.append(
                        f"{key}.{unknown} is not used by {key}={name}{of_kind}: only methods of "
                        f"kind {', '.join(users)} read it; remove it, or choose one of those"
                    )
                    continue
                close = difflib.get_close_matches(str(unknown), list(fields), 1)
                hint = f"did you mean {key}.{close[0]}? " if close else ""
                self.problems.append(
                    f"{key}.{unknown} is not a known key: {hint}known keys are " + ", ".join(fields)
                )
        values: dict[str, Any] = {}
        for name, field in fields.items():
            child = f"{key}.{name}" if key else name
            if name not in value:
                if field.default is not dataclasses.MISSING:
                    values[name] = field.default
                    continue
                self.problems.append(f"{child} is missing: expected {_type_name(hints[name])}")
                values[name] = None
                continue
            values[name] = self.read(hints[name], value[name], child, field.metadata)
        return kind(**values)


def _fits(kind: Any, value: Any) -> bool:
    if get_origin(kind) is Literal:
        return value in get_args(kind) and not isinstance(value, bool)
    if get_origin(kind) is list:
        return isinstance(value, ListConfig | list)
    if dataclasses.is_dataclass(kind):
        return isinstance(value, DictConfig | dict)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _method_settings(checker: _Checker, method: Any) -> MethodSettings | None:
    if not isinstance(method, DictConfig | dict):
        checker.fail("method", method, "a mapping")
        return None
    kind = method.get("kind")
    if kind not in _METHOD_CLASSES:
        checker.fail("method.kind", kind, _type_name(MethodKind))
        return None
    return checker.node(_METHOD_CLASSES[kind], method, "method")


def _with_sharding(checker: _Checker, trainer: TrainerSettings, node: Any) -> TrainerSettings:
    """``trainer`` with its FSDP settings, when ``trainer.strategy`` is clintune's FSDP."""
    strategy = node.get("strategy")
    if not OmegaConf.is_dict(strategy) or strategy.get("_target_") != FSDP_STRATEGY:
        return trainer
    sharding = checker.node(FSDPSettings, strategy, "trainer.strategy")
    size = sharding.data_parallel_size
    if isinstance(size, int) and isinstance(trainer.devices, int) and size != trainer.devices:
        checker.problems.append(
            f"trainer.strategy.data_parallel_size={size} must equal trainer.devices="
            f"{trainer.devices} (parameters are sharded over every process), or be auto"
        )
    return dataclasses.replace(trainer, sharding=sharding)


def _cross_checks(checker: _Checker, settings: Settings, cfg: DictConfig) -> None:
    method = settings.method
    stages = [("method", method)]
    if isinstance(method, DPOSettings) and method.sft is not None:
        stages.append(("method.sft", method.sft))
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    sharded = "fsdp" in str(strategy.get("_target_") if OmegaConf.is_dict(strategy) else strategy)
    for key, stage in stages:
        if isinstance(stage, SFTSettings | DPOSettings) and stage.save == "best_metric" and sharded:
            # Each rank would generate for its own share of the validation examples, but
            # sharded weights need every rank in every forward pass.
            checker.problems.append(
                f"{key}.save='best_metric' generates on the validation split during training, "
                "which clintune does not do under FSDP: use best (lowest eval/loss) or last"
            )
    lora = bool(OmegaConf.select(cfg, "model.lora.enabled", default=False))
    quantization = OmegaConf.select(cfg, "model.quantization", default=None)
    if quantization is not None and settings.trainer.sharding is not None:
        checker.problems.append(
            f"model.quantization={quantization} cannot be sharded (4-bit weights under FSDP are "
            "not supported): use trainer=gpu or trainer=ddp for QLoRA"
        )
    if isinstance(method, PREFERENCE_SETTINGS):
        if method.reference_mode == "adapter_disabled" and not lora:
            checker.problems.append(
                "method.reference='adapter_disabled' needs a LoRA policy: set "
                "model.lora.enabled=true, or use method.reference=precompute or copy"
            )
        if method.reference_mode == "copy" and lora:
            checker.problems.append(
                "method.reference='copy' with model.lora.enabled=true would copy the whole "
                "model for nothing: use method.reference=adapter_disabled (or precompute)"
            )
    if isinstance(method, KTOSettings) and not method.unpaired.label_field.strip():
        checker.problems.append(
            "method.unpaired.label_field='' is not allowed: expected the name of the field "
            "holding desirable/undesirable (default: label)"
        )


def settings_from(cfg: DictConfig) -> Settings:
    """The typed settings of a composed train or evaluate config; raises ``ConfigError``
    listing every problem."""
    checker = _Checker()
    method = _method_settings(checker, cfg.get("method"))
    sections: dict[str, Any] = {}
    for name in ("trainer", "eval", "stages", "checkpoint", "subsample", "sweep"):
        field = {f.name: f for f in dataclasses.fields(Settings)}[name]
        kind = get_type_hints(Settings)[name]
        if name not in cfg:
            if field.default is dataclasses.MISSING:
                checker.problems.append(f"{name} is missing")
            continue
        if name == "checkpoint" and not OmegaConf.is_dict(cfg.get(name)):
            continue  # evaluate.py's checkpoint=PATH, not train.py's checkpoint section
        sections[name] = checker.read(kind, cfg.get(name), name)
    if sections.get("trainer") is not None:
        sections["trainer"] = _with_sharding(checker, sections["trainer"], cfg.trainer)
    seed = checker.read(int, cfg.get("seed"), "seed")
    task = cfg.get("task")
    if isinstance(task, DictConfig) and task.get("_target_") == CUSTOM_TASK_TARGET:
        _read_custom_task(checker, task)
    if checker.problems:
        raise ConfigError(checker.problems)
    settings = Settings(seed=seed, method=method, **sections)  # type: ignore[arg-type]
    _cross_checks(checker, settings, cfg)
    if checker.problems:
        raise ConfigError(checker.problems)
    return settings
