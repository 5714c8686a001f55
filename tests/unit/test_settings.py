"""The whole config is checked before any work: every bad value at once, by key, with what is
allowed; and the stage cache keys change exactly when the weights would."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, compose_train

from clintune.settings import (
    GRID_METHOD_KEYS,
    ConfigError,
    DPOSettings,
    SFTSettings,
    settings_from,
)
from clintune.stages import StageContext, sft_stage_key

BAD_CHOICES = [
    "method=dpo",
    "method.module.loss_type=sigmod",
    "method.save=bset",
    "method.pairs.source=labels",
    "method.reference=copyy",
]


def _problems(overrides: list[str], cache: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        settings_from(compose_train(overrides, cache))
    return raised.value.problems


def test_every_bad_choice_is_reported_at_once_with_the_allowed_values(tmp_path: Path) -> None:
    problems = _problems(BAD_CHOICES, tmp_path)
    assert len(problems) == 4
    expected = {
        "method.module.loss_type='sigmod'": "'sigmoid', 'ipo', 'hinge', 'robust'",
        "method.save='bset'": "'best', 'last', 'best_metric'",
        "method.pairs.source='labels'": "'auto', 'data', 'label', 'on_policy'",
        "method.reference='copyy'": "'precompute', 'adapter_disabled', 'copy'",
    }
    for key_value, allowed in expected.items():
        (line,) = [p for p in problems if p.startswith(key_value)]
        assert allowed in line


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("method.train.batch_size=0", "method.train.batch_size=0 is not allowed: expected >= 1"),
        ("method.train.epochs=1.5", "method.train.epochs=1.5 is not allowed: expected an integer"),
        ("method.module.learning_rate=0", "expected > 0"),
        ("method.module.warmup_ratio=2", "expected >= 0 and <= 1"),
        ("method.module.label_smoothing=0.5", "expected >= 0 and < 0.5"),
        ("method.module.beta=-1", "method.module.beta=-1"),
        ("method.pairs.temperature=0", "method.pairs.temperature=0"),
        ("method.share_prompt=maybe", "expected true or false"),
        ("method.sft.save=bset", "method.sft.save='bset'"),
        ("eval.bootstrap.confidence=1.0", "expected > 0 and < 1"),
        ("eval.limit=0", "eval.limit=0"),
        ("trainer.precision=16-bit", "trainer.precision='16-bit'"),
        ("trainer.accelerator=tpu", "trainer.accelerator='tpu'"),
        ("trainer.devices=0", "trainer.devices=0"),
        ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps=-1"),
        ("stages.reuse=sometimes", "stages.reuse='sometimes'"),
        ("subsample.train=0", "subsample.train=0"),
    ],
)
def test_each_bad_value_names_its_key(override: str, fragment: str, tmp_path: Path) -> None:
    problems = _problems(["method=dpo", override], tmp_path)
    assert len(problems) == 1, problems
    assert fragment in problems[0]


def test_cross_field_problems_are_caught_before_loading(tmp_path: Path) -> None:
    problems = _problems(["method=dpo", "method.reference=adapter_disabled"], tmp_path)
    assert "model.lora.enabled=true" in problems[0]
    problems = _problems(
        ["method=dpo", "method.reference=copy", "model.lora.enabled=true"], tmp_path
    )
    assert "copy the whole model" in problems[0]


@pytest.mark.parametrize(
    ("method", "override", "fragment"),
    [
        ("rpo", "method.module.nll_alpha=-0.5", "method.module.nll_alpha=-0.5"),
        ("orpo", "method.module.beta=0", "method.module.beta=0 is not allowed: expected > 0"),
        ("simpo", "method.module.gamma=-1", "method.module.gamma=-1 is not allowed"),
        ("simpo", "method.module.label_smoothing=0.5", "expected >= 0 and < 0.5"),
        ("kto", "method.module.desirable_weight=0", "method.module.desirable_weight=0"),
        ("kto", "method.unpaired.source=pair", "did you mean 'pairs'?"),
        ("kto", "method.unpaired.label_field=''", "method.unpaired.label_field=''"),
        ("kto", "method.reference=adapter_disabled", "model.lora.enabled=true"),
    ],
)
def test_the_other_preference_methods_check_their_keys(
    method: str, override: str, fragment: str, tmp_path: Path
) -> None:
    problems = _problems([f"method={method}", override], tmp_path)
    assert len(problems) == 1, problems
    assert fragment in problems[0], problems


@pytest.mark.parametrize(
    ("method", "kind", "has_sft", "reference"),
    [
        ("orpo", "orpo", False, None),
        ("simpo", "simpo", True, None),
        ("kto", "kto", True, "precompute"),
        ("rpo", "dpo", True, "precompute"),
    ],
)
def test_the_other_preference_methods_compose(
    method: str, kind: str, has_sft: bool, reference: str | None, tmp_path: Path
) -> None:
    settings = settings_from(compose_train([f"method={method}"], tmp_path))
    assert settings.method.kind == kind and settings.method.name == method
    assert (settings.method.sft_stage is not None) == has_sft
    assert settings.method.reference_mode == reference
    if has_sft:  # the same SFT stage as method=sft, so a sweep trains it once
        sft = settings_from(compose_train(["method=sft"], tmp_path)).method
        assert dataclasses.asdict(settings.method.sft_stage) == dataclasses.asdict(sft)
    if method == "rpo":
        assert settings.method.module.nll_alpha == 1.0
    if method == "orpo":  # it replaces SFT: SFT's learning rate
        cfg = compose_train([f"method={method}"], tmp_path)
        assert settings.method.module.learning_rate == cfg.model.learning_rate


def test_a_misspelt_key_in_an_experiment_file_is_caught(tmp_path: Path) -> None:
    cfg = compose_train(["method=dpo"], tmp_path)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.method.train.max_step = 40  # what a merged experiment file may add
    (problem,) = _problems_of(cfg)
    assert "method.train.max_step is not a known key: did you mean method.train.max_steps?" in (
        problem
    )


def _problems_of(cfg: object) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        settings_from(cfg)  # type: ignore[arg-type]
    return raised.value.problems


def _refused_by_train_py(
    args: list[str], tmp_path: Path, run_env: dict[str, str]
) -> tuple[list[str], str]:
    """train.py with ``args`` must exit 1 within 10 s, without a stack trace and before any
    model, stage or reference cache exists; its ``error:`` lines and stderr."""
    cache = tmp_path / "cache"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env={**run_env, "CLINTUNE_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 1, result.stderr
    assert seconds < 10, f"took {seconds:.1f} s"
    assert "Traceback" not in result.stderr + result.stdout
    assert not cache.exists()  # no model was built or loaded, no stage or reference cache
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return errors, result.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["method=base"],
        ["method=dpo"],
        ["method=dpo_only"],
        ["method=dpo", "model.lora.enabled=true", "method.reference=adapter_disabled"],
        ["experiment=demo_grid", "method=dpo"],
        ["experiment=study_grid", "method=base"],
        ["experiment=qlora_llama3", "method=dpo"],
        ["trainer=fsdp"],
        ["trainer=ddp_cpu", "method=dpo"],
        ["trainer=fsdp_cpu", "method=dpo", "method.reference=copy"],
        ["task=pubmedqa_custom", "method=dpo"],
        ["task=triage_custom"],
    ],
)
def test_shipped_configs_are_valid(overrides: list[str], tmp_path: Path) -> None:
    settings = settings_from(compose_train(overrides, tmp_path))
    if "method=dpo" in overrides:
        assert isinstance(settings.method, DPOSettings)
        assert isinstance(settings.method.sft, SFTSettings)
    assert settings.eval.bootstrap.samples >= 1


def test_train_py_fails_fast_with_one_error_line_per_bad_key(
    tmp_path: Path, run_env: dict[str, str]
) -> None:
    """Exit 1 within 10 s, one ``error:`` line per bad key, no stack trace, nothing loaded."""
    run_dir = tmp_path / "run"
    errors, stderr = _refused_by_train_py(BAD_CHOICES, tmp_path, run_env)
    assert len(errors) == 4, stderr
    assert any("did you mean 'sigmoid'" in line for line in errors)
    assert not (run_dir / "job.json").exists() and not (run_dir / "wandb").exists()


def test_the_keys_a_method_may_carry_unread_are_exactly_what_experiments_set() -> None:
    """GRID_METHOD_KEYS is derived from conf/experiment: a new experiment that grafts another
    key onto every method of its grid fails here (and in test_conf_all) until it is added."""
    grafted: set[str] = set()
    for path in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        grafted |= set((yaml.safe_load(path.read_text()) or {}).get("method") or {})
    assert grafted == GRID_METHOD_KEYS


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # "+" is what Hydra itself suggests once the plain override is refused.
        (
            ["method=simpo", "+method.reference=copy"],
            "error: method.reference is not used by method=simpo: only methods of kind dpo, "
            "kto read it; remove it, or choose one of those",
        ),
        (
            ["method=orpo", "+method.reference=precompute"],
            "error: method.reference is not used by method=orpo: only methods of kind dpo, kto",
        ),
        (
            ["method=sft", "+method.pairs.source=data"],
            "error: method.pairs is not used by method=sft: only methods of kind dpo, orpo, "
            "simpo, kto",
        ),
        (
            ["method=rpo", "+method.unpaired.source=data"],
            "error: method.unpaired is not used by method=rpo (kind dpo): only methods of kind kto",
        ),
        # Not a key of any method (beta is method.module.beta): a plain unknown key.
        (
            ["method=sft", "+method.beta=0.3"],
            "error: method.beta is not a known key: known keys are name, kind, module, train, save",
        ),
    ],
)
def test_train_py_refuses_another_methods_key_before_loading(
    overrides: list[str], expected: str, tmp_path: Path, run_env: dict[str, str]
) -> None:
    """Another method's key would be silently ignored by this method: exit 1 within seconds,
    naming the key and the methods that read it, with nothing loaded."""
    errors, stderr = _refused_by_train_py(overrides, tmp_path, run_env)
    assert len(errors) == 1 and errors[0].startswith(expected), stderr


def test_every_misplaced_method_key_is_reported_at_once(tmp_path: Path) -> None:
    cfg = compose_train(
        ["method=sft", "+method.pairs.seed=1", "+method.reference=copy", "+method.trian=1"],
        tmp_path,
    )
    problems = _problems_of(cfg)
    assert [p.split(" ")[0] for p in problems] == [
        "method.pairs", "method.reference", "method.trian",
    ]  # fmt: skip
    assert "not used by method=sft: only methods of kind dpo, orpo, simpo, kto" in problems[0]
    assert "did you mean method.train?" in problems[2]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=base", "+method.sft.train.max_steps=40", "+method.train.max_steps=40"],
        ["method=sft", "+method.sft.train.max_steps=40"],
        ["method=orpo", "+method.sft.train.max_steps=40"],
    ],
)
def test_the_keys_experiments_graft_ride_on_every_method(
    overrides: list[str], tmp_path: Path
) -> None:
    """method.sft and method.train on methods that read neither or not both (base; sft and
    orpo have no SFT stage): what `experiment=demo_grid method=base,sft,...,orpo` composes to."""
    settings_from(compose_train(overrides, tmp_path))


def test_the_fsdp_strategy_is_checked_before_anything_loads(tmp_path: Path) -> None:
    sharding = settings_from(compose_train(["trainer=fsdp"], tmp_path)).trainer.sharding
    assert sharding is not None and sharding.param_dtype == "bfloat16"
    assert settings_from(compose_train(["trainer=ddp_cpu"], tmp_path)).trainer.sharding is None
    cfg = compose_train(
        [
            "trainer=fsdp_cpu",
            "trainer.strategy.param_dtype=bf16",
            "trainer.strategy.data_parallel_size=4",
            "+trainer.strategy.activation_checkpoint=true",
        ],
        tmp_path,
    )
    problems = _problems_of(cfg)
    assert any(p.startswith("trainer.strategy.param_dtype='bf16' is not allowed") for p in problems)
    assert any("did you mean trainer.strategy.activation_checkpointing?" in p for p in problems)
    qlora = ["model=llama3", "model.quantization=4bit", "model.lora.enabled=true"]
    cfg = compose_train([*qlora, "trainer=fsdp"], tmp_path)
    assert any("cannot be sharded" in problem for problem in _problems_of(cfg))
    cfg = compose_train(["trainer=fsdp_cpu", "trainer.strategy.data_parallel_size=4"], tmp_path)
    assert _problems_of(cfg) == [
        "trainer.strategy.data_parallel_size=4 must equal trainer.devices=2 (parameters are "
        "sharded over every process), or be auto"
    ]


# ---- stage cache keys ----------------------------------------------------------------------

SPLITS = {"train": [{"id": "a", "text": "x", "label": "yes"}], "val": [{"id": "b"}]}


def _sft_key(overrides: list[str], tmp_path: Path, splits: dict | None = None) -> str:
    cfg = compose_train(overrides, tmp_path)
    settings = settings_from(cfg)
    method = settings.method
    stage = method.sft if isinstance(method, DPOSettings) else method
    assert isinstance(stage, SFTSettings)
    ctx = StageContext(cfg, settings, None, splits or SPLITS, tmp_path, None)  # type: ignore[arg-type]
    return sft_stage_key(ctx, stage)


@pytest.mark.parametrize(
    "change",
    [
        ["model=tiny_mistral"],
        ["model.lora.enabled=true"],
        ["model.max_length=256"],
        ["task=triage"],
        ["task.instruction=Answer."],
        ["method.train.epochs=2"],
        ["method.train.batch_size=8"],
        ["method.module.learning_rate=0.01"],
        ["method.save=last"],
        ["trainer.precision=bf16-mixed"],
        ["seed=7"],
    ],
)
def test_what_decides_the_weights_retrains(change: list[str], tmp_path: Path) -> None:
    assert _sft_key(change, tmp_path) != _sft_key([], tmp_path)


def test_other_training_data_retrains(tmp_path: Path) -> None:
    other = {**SPLITS, "train": [{"id": "a", "text": "y", "label": "yes"}]}
    assert _sft_key([], tmp_path, other) != _sft_key([], tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        ["method=dpo"],  # its SFT stage is method=sft's: trained once for both
        ["eval.batch_size=4", "eval.limit=10", "eval.bootstrap.samples=20"],
        ["logger=none"],
        ["stages.resume=false", "checkpoint.every_n_steps=5"],
        ["task.judge.kind=none", "task=summarization"],
    ],
)
def test_what_does_not_decide_the_weights_reuses(change: list[str], tmp_path: Path) -> None:
    baseline = ["task=summarization"] if "task=summarization" in change else []
    assert _sft_key(change, tmp_path) == _sft_key(baseline, tmp_path)


def test_the_key_reads_the_typed_settings_not_a_second_copy(tmp_path: Path) -> None:
    cfg = compose_train([], tmp_path)
    settings = settings_from(cfg)
    assert isinstance(settings.method, SFTSettings)
    changed = dataclasses.replace(
        settings, method=dataclasses.replace(settings.method, save="last")
    )
    ctx = StageContext(cfg, settings, None, SPLITS, tmp_path, None)  # type: ignore[arg-type]
    ctx_changed = StageContext(cfg, changed, None, SPLITS, tmp_path, None)  # type: ignore[arg-type]
    assert sft_stage_key(ctx, settings.method) != sft_stage_key(ctx_changed, changed.method)


def test_evaluate_configs_with_a_checkpoint_path_are_valid(tmp_path: Path) -> None:
    """evaluate.py's ``checkpoint=PATH`` is a path, not train.py's checkpoint section."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"checkpoint={tmp_path}"])
    assert settings_from(cfg).checkpoint is None
