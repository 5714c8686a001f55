"""Tasks: one module per task family (schema, prompt, target, parser, metrics)."""

from clintune.tasks.base import Task
from clintune.tasks.data import DataValidationError, FieldSpec, load_jsonl

__all__ = ["DataValidationError", "FieldSpec", "Task", "load_jsonl"]
