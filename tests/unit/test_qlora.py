"""model.quantization=4bit (QLoRA): bad configs and machines fail early with one clear message,
the 24 GB experiment composes, the full-precision merge a 4-bit DPO start needs is exact, and
(on a CUDA machine) a real 4-bit load trains only LoRA parameters. On a CUDA machine without
bitsandbytes that test fails with the install step rather than skipping: CI installs only
``.[dev]``, and a skip there would pass without QLoRA ever having run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, run_script
from omegaconf import OmegaConf

from clintune.errors import UserError
from clintune.methods.losses import sft_loss
from clintune.models.loading import (
    CHECKPOINT_MANIFEST,
    MERGED_MARKER,
    check_quantization,
    load_for_training,
    load_model,
    merged_base_dir,
    read_checkpoint_manifest,
    save_trained,
)
from clintune.tokenization import collate_sft, encode_example

MODELS = ["tiny_llama", "tiny_mistral", "llama3", "mistral2"]
MESSAGES = [
    [{"role": "user", "content": "Dysuria and nitrite positive. Criteria met?"}],
    [{"role": "user", "content": "Cough only, urinalysis normal. Criteria met?"}],
]
PIP_STEP = 'pip install -e ".[qlora]"'


def _model_cfg(quantization: object = "4bit", lora: bool | None = True):
    cfg: dict[str, object] = {"name": "m", "quantization": quantization}
    if lora is not None:
        cfg["lora"] = {"enabled": lora}
    return OmegaConf.create(cfg)


# ------------------------------------------------------------------ check_quantization


def test_null_quantization_passes_anywhere() -> None:
    for lora in (True, False, None):
        assert check_quantization(_model_cfg(None, lora), cuda_available=False) is None
    assert check_quantization(OmegaConf.create({"name": "judge"}), cuda_available=False) is None


def test_a_valid_qlora_config_passes() -> None:
    assert check_quantization(_model_cfg(), True, bitsandbytes_version="0.49.0") == "4bit"


@pytest.mark.parametrize("value", ["8bit", "4-bit", "nf4", True, 4])
def test_unknown_quantization_names_the_field_and_the_allowed_values(value: object) -> None:
    with pytest.raises(UserError) as error:
        check_quantization(_model_cfg(value), True, bitsandbytes_version="0.49.0")
    message = str(error.value)
    assert "model.quantization must be one of null, 4bit" in message
    assert repr(value) in message


@pytest.mark.parametrize("lora", [False, None])
def test_4bit_without_lora_says_to_enable_it(lora: bool | None) -> None:
    with pytest.raises(UserError) as error:
        check_quantization(_model_cfg(lora=lora), True, bitsandbytes_version="0.49.0")
    assert "QLoRA trains LoRA adapters on a frozen 4-bit base: set model.lora.enabled=true" in str(
        error.value
    )


def test_4bit_without_cuda_says_it_needs_a_gpu() -> None:
    with pytest.raises(UserError) as error:
        check_quantization(_model_cfg(), cuda_available=False, bitsandbytes_version="0.49.0")
    assert "bitsandbytes 4-bit needs a CUDA GPU; run with trainer=gpu on a GPU machine" in str(
        error.value
    )


def test_4bit_without_bitsandbytes_gives_the_install_step() -> None:
    with pytest.raises(UserError) as error:
        check_quantization(_model_cfg(), cuda_available=True, bitsandbytes_version=None)
    assert "bitsandbytes, which is not installed" in str(error.value)
    assert PIP_STEP in str(error.value)


def test_4bit_with_a_too_old_bitsandbytes_gives_the_install_step() -> None:
    with pytest.raises(UserError) as error:
        check_quantization(_model_cfg(), cuda_available=True, bitsandbytes_version="0.45.5")
    assert "found 0.45.5" in str(error.value)
    assert PIP_STEP in str(error.value)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_has_the_switch_off(model: str, cache_dir: Path) -> None:
    cfg = compose_train([f"model={model}"], cache_dir)
    assert "quantization" in cfg.model and cfg.model.quantization is None
    assert check_quantization(cfg.model, cuda_available=False) is None


# ------------------------------------------------------------------ the 24 GB experiment


def _global_batch(train_cfg) -> int:
    return int(train_cfg.batch_size) * int(train_cfg.accumulate_grad_batches)


def test_qlora_experiment_composes(cache_dir: Path) -> None:
    cfg = compose_train(["experiment=qlora_llama3", "task=triage", "method=dpo"], cache_dir)
    assert cfg.model.name == "llama3"
    assert cfg.model.quantization == "4bit"
    assert cfg.model.lora.enabled is True
    assert cfg.model.gradient_checkpointing is True
    assert cfg.model.dtype == "bfloat16"
    assert cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.precision == "bf16-mixed"
    assert check_quantization(cfg.model, True, bitsandbytes_version="0.49.0") == "4bit"
    # Small micro-batches; accumulation keeps the study's global batches.
    plain = compose_train(["method=dpo"], cache_dir)
    assert cfg.method.train.batch_size <= 2 and cfg.method.sft.train.batch_size <= 2
    assert _global_batch(cfg.method.train) == _global_batch(plain.method.train)
    assert _global_batch(cfg.method.sft.train) == _global_batch(plain.method.sft.train)
    assert cfg.method.sft.module._target_ == "clintune.methods.sft.SFTModule"


def test_qlora_experiment_with_sft_and_dpo_only_as_documented(cache_dir: Path) -> None:
    sft = compose_train(
        ["experiment=qlora_llama3", "method=sft", "method.train.batch_size=2"], cache_dir
    )
    dpo = compose_train(["experiment=qlora_llama3", "method=dpo"], cache_dir)
    # The same SFT stage config, so a method=sft,dpo sweep trains SFT once.
    assert OmegaConf.to_container(sft.method.train) == OmegaConf.to_container(dpo.method.sft.train)
    dpo_only = compose_train(
        ["experiment=qlora_llama3", "method=dpo_only", "method.sft=null"], cache_dir
    )
    assert dpo_only.method.sft is None
    assert dpo_only.method.train.batch_size == dpo.method.train.batch_size


# ------------------------------------------------------------------ this CPU machine


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_4bit_load_on_cpu_is_one_clear_error_before_anything_loads(tmp_path: Path) -> None:
    cfg = compose_train(
        ["model=tiny_llama", "model.quantization=4bit", "model.lora.enabled=true"], tmp_path
    )
    with pytest.raises(UserError, match="bitsandbytes 4-bit needs a CUDA GPU"):
        load_for_training(cfg.model, tmp_path)
    with pytest.raises(UserError, match="bitsandbytes 4-bit needs a CUDA GPU"):
        load_model(cfg.model, tmp_path, checkpoint=tmp_path / "weights")
    assert not (tmp_path / "models").exists()  # failed before building the tiny model


def test_4bit_without_lora_fails_before_anything_loads(tmp_path: Path) -> None:
    cfg = compose_train(["model=tiny_llama", "model.quantization=4bit"], tmp_path)
    with pytest.raises(UserError, match=r"set model\.lora\.enabled=true"):
        load_for_training(cfg.model, tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_train_py_with_4bit_on_cpu_prints_the_message_not_a_traceback(run_env) -> None:
    result = run_script(
        "train.py",
        ["model.quantization=4bit", "model.lora.enabled=true", "logger=none", "subsample.train=8"],
        run_env,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: model.quantization=4bit: bitsandbytes 4-bit needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


def _lora_checkpoint(cfg, cache_dir: Path, out_dir: Path, seed: int) -> tuple[object, object]:
    """A trained-looking (non-zero) LoRA adapter saved as a clintune checkpoint."""
    torch.manual_seed(seed)
    loaded, lineage = load_for_training(cfg.model, cache_dir)
    for name, parameter in loaded.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    save_trained(loaded.model, loaded.tokenizer, out_dir, lineage)
    return loaded.model, loaded.tokenizer


def _logits(model, tokenizer) -> torch.Tensor:
    batch = collate_sft(
        [encode_example(tokenizer, m, "yes", 128) for m in MESSAGES], tokenizer.pad_token_id
    )
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits.float()


def test_merge_for_a_4bit_start_is_exact_and_keyed_by_content(
    tiny_models, cache_dir: Path, tmp_path: Path
) -> None:
    """What a 4-bit DPO start quantizes: base + SFT adapter merged in full precision, found
    again from the adapter's copy inside a later checkpoint (init_adapter)."""
    from transformers import AutoModelForCausalLM

    cfg = compose_train(["model=tiny_llama", "model.lora.enabled=true"], cache_dir)
    adapter_model, tokenizer = _lora_checkpoint(cfg, cache_dir, tmp_path / "sft", seed=0)
    merged = merged_base_dir(cfg.model, tmp_path / "sft", cache_dir)
    assert (merged / MERGED_MARKER).is_file() and merged.parent == cache_dir / "merged"
    reloaded = AutoModelForCausalLM.from_pretrained(str(merged))
    torch.testing.assert_close(
        _logits(reloaded, tokenizer), _logits(adapter_model, tokenizer), rtol=1e-4, atol=1e-4
    )
    copy = tmp_path / "dpo" / "init_adapter"
    shutil.copytree(tmp_path / "sft", copy)
    assert merged_base_dir(cfg.model, copy, cache_dir) == merged
    _lora_checkpoint(cfg, cache_dir, tmp_path / "other", seed=1)
    assert merged_base_dir(cfg.model, tmp_path / "other", cache_dir) != merged


# ------------------------------------------------------------------ a real GPU


def require_bitsandbytes() -> None:
    """Fail (not skip) when bitsandbytes is missing: only called on a machine with CUDA, where
    the real 4-bit test can and must run."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pytest.fail(
            "this machine has CUDA but bitsandbytes is not installed, so the real 4-bit QLoRA "
            f"test cannot run; install the extra: {PIP_STEP}",
            pytrace=False,
        )


def test_a_cuda_machine_without_bitsandbytes_fails_with_the_install_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises
    # BaseException: a skip (pytest's Skipped) must be caught here too, and then fail below.
    with pytest.raises(BaseException) as outcome:
        require_bitsandbytes()
    assert outcome.type is pytest.fail.Exception, f"{outcome.typename}, not a failure"
    assert PIP_STEP in str(outcome.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs a CUDA GPU")
def test_4bit_lora_trains_only_the_adapter_and_saves_only_it(cache_dir: Path, tmp_path) -> None:
    require_bitsandbytes()
    cfg = compose_train(
        [
            "model=tiny_llama",
            "model.quantization=4bit",
            "model.lora.enabled=true",
            "model.gradient_checkpointing=true",
        ],
        cache_dir,
    )
    torch.manual_seed(0)
    loaded, lineage = load_for_training(cfg.model, cache_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.is_lora
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    batch = collate_sft(
        [
            encode_example(tokenizer, m, a, 128)
            for m, a in zip(MESSAGES, ["yes", "no"], strict=True)
        ],
        tokenizer.pad_token_id,
    )
    batch = {key: value.cuda() for key, value in batch.items()}
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sft_loss(logits, batch["labels"])
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())

    # Saved: the adapter only; reloaded onto a freshly quantized base, the same function.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    save_trained(model, tokenizer, tmp_path / "weights", lineage)
    saved = {p.name for p in (tmp_path / "weights").iterdir()}
    assert "adapter_model.safetensors" in saved and CHECKPOINT_MANIFEST in saved
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in saved)
    assert read_checkpoint_manifest(tmp_path / "weights")["kind"] == "lora"
    reloaded = load_model(cfg.model, cache_dir, checkpoint=tmp_path / "weights")
    assert reloaded.is_lora
    torch.testing.assert_close(
        _logits(reloaded.model, tokenizer), _logits(model, tokenizer), rtol=1e-3, atol=1e-3
    )

    # DPO from this adapter: merged in full precision, then quantized; a fresh adapter on top.
    merged_root = cache_dir / "merged"
    before = set(merged_root.iterdir()) if merged_root.is_dir() else set()
    policy, dpo_lineage = load_for_training(cfg.model, cache_dir, tmp_path / "weights")
    assert dpo_lineage["merged_adapter"] == "init_adapter"
    assert getattr(policy.model.get_base_model(), "is_loaded_in_4bit", False)
    assert all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)
    new = [d for d in set(merged_root.iterdir()) - before if (d / MERGED_MARKER).is_file()]
    assert len(new) == 1
