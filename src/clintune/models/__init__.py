"""Models: hub ids or local directories, the tiny local models, and LoRA."""

from clintune.models.loading import CHECKPOINT_MANIFEST, LoadedModel, load_model, save_trained

__all__ = ["CHECKPOINT_MANIFEST", "LoadedModel", "load_model", "save_trained"]
