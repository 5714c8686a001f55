"""The study's hub models' shapes, declared in ``conf/model`` (``model.architecture``), so
that what ``model=llama3`` or ``model=mistral2`` should be is known without the hub: a
transformers config, a model on the meta device (parameter counts, the sharding plan), and a
check that the weights a run downloads are the model its config names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clintune.errors import UserError

#: ``model.architecture.arch`` → the transformers config class that builds it.
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig"}


def transformers_config(architecture: Mapping[str, Any]) -> Any:
    """The transformers config of ``model.architecture`` (every key but ``arch`` is passed on
    as a config argument, under its transformers name)."""
    import transformers

    spec = dict(architecture)
    arch = spec.pop("arch", None)
    if arch not in CONFIG_CLASSES:
        raise UserError(
            f"model.architecture.arch must be one of {sorted(CONFIG_CLASSES)}, got {arch!r}"
        )
    return getattr(transformers, CONFIG_CLASSES[arch])(**spec)


def meta_model(architecture: Mapping[str, Any], dtype: Any = None) -> Any:
    """The causal LM of ``model.architecture`` with its parameters on the meta device (in
    ``dtype``, default float32): shapes without memory, so an 8B model is built in seconds on
    any machine."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            transformers_config(architecture), dtype=dtype or torch.float32
        )


def _value(config: Any, key: str) -> Any:
    if key == "rope_theta":  # transformers 5 keeps it inside rope_parameters
        parameters = getattr(config, "rope_parameters", None) or {}
        return parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if key == "arch":
        return config.model_type
    return getattr(config, key, None)


def architecture_mismatches(config: Any, architecture: Mapping[str, Any]) -> list[str]:
    """``key: declared ≠ loaded`` for every declared value the loaded config contradicts."""
    problems = []
    for key, declared in architecture.items():
        loaded = _value(config, key)
        if loaded != declared:
            problems.append(f"{key}: declared {declared!r}, loaded {loaded!r}")
    return problems


def check_architecture(config: Any, architecture: Mapping[str, Any] | None, source: str) -> None:
    """Stops a run whose downloaded weights are not the model ``model.architecture``
    describes (a wrong hub id or local directory would otherwise train and be reported under
    the config's name)."""
    if not architecture:
        return
    problems = architecture_mismatches(config, architecture)
    if problems:
        raise UserError(
            f"the weights at {source} are not the model.architecture this config declares ("
            + "; ".join(problems)
            + "): point model.pretrained at the right model, or set model.architecture=null "
            "for another one"
        )
