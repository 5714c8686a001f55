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
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from clintune.errors import UserError

MethodKind = Literal["none", "sft", "dpo", "orpo", "simpo", "kto"]
SaveChoice = Literal["best", "last"]
ReferenceMode = Literal["precompute", "adapter_disabled", "copy"]
PairSource = Literal["auto", "data", "label", "on_policy"]
UnpairedSource = Literal["auto", "data", "pairs"]
DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
Accelerator = Literal["cpu", "gpu", "cuda", "mps", "auto"]
# Lightning 2.6's accepted values (lightning.fabric.connector._PRECISION_INPUT).
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
_METHOD_KEYS = {
    field.name for kind in _METHOD_CLASSES.values() for field in dataclasses.fields(kind)
}


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


@dataclass(frozen=True)
class TrainerSettings:
    """The keys clintune reads; the node goes to Lightning's Trainer whole (other keys too)."""

    accelerator: Accelerator
    devices: int | Literal["auto"] | list[int] = dataclasses.field(metadata=_minimum(1))
    precision: Precision
    # More than one is refused by clintune.distributed with its own message (one job, one
    # machine); the default is Lightning's.
    num_nodes: int = dataclasses.field(default=1, metadata=_minimum(1))


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
            # An experiment sets method.train/method.sft for every method of its grid, so a
            # method node tolerates the keys of the other methods; a typo is still caught.
            tolerated = _METHOD_KEYS if kind in _METHOD_CLASSES.values() else set()
            for unknown in sorted(set(value) - set(fields) - tolerated):
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


def _cross_checks(checker: _Checker, settings: Settings, cfg: DictConfig) -> None:
    method = settings.method
    lora = bool(OmegaConf.select(cfg, "model.lora.enabled", default=False))
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
    seed = checker.read(int, cfg.get("seed"), "seed")
    if checker.problems:
        raise ConfigError(checker.problems)
    settings = Settings(seed=seed, method=method, **sections)  # type: ignore[arg-type]
    _cross_checks(checker, settings, cfg)
    if checker.problems:
        raise ConfigError(checker.problems)
    return settings
