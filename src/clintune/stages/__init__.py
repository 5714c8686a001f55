"""The recipes that run a method's stages (SFT, and the preference stage of DPO, RPO, ORPO,
SimPO and KTO), over what they share in ``common``.

``method=sft`` is one SFT stage. ``method=dpo`` (and ``rpo``, ``simpo``, ``kto``) is an SFT
stage (reused from the cache when an identical one already finished) followed by the
preference stage from its weights; ``method=orpo`` is the preference stage alone. Every stage leaves
its weights, in Hugging Face format, in the output directory it is given."""

from clintune.stages.common import StageContext, StageResult
from clintune.stages.dpo import (
    collate_with_reference,
    pair_collate,
    run_dpo_stage,
    run_preference_stage,
    start_from_checkpoint,
)
from clintune.stages.sft import STAGE_COMPLETE, run_sft_stage, sft_stage_key

__all__ = [
    "STAGE_COMPLETE",
    "StageContext",
    "StageResult",
    "collate_with_reference",
    "pair_collate",
    "run_dpo_stage",
    "run_preference_stage",
    "run_sft_stage",
    "sft_stage_key",
    "start_from_checkpoint",
]
