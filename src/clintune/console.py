"""A console a person can read: each line once, nothing the user cannot act on.

Lightning's top-level package adds its own console handler *and* lets records propagate to
the root logger, which Hydra has configured, so every Lightning INFO line appeared twice.
Its logger connector also advertises another logging service on every fit, and its pytree
helper raises a deprecation warning meant for Lightning's own developers."""

from __future__ import annotations

import logging
import warnings

_ADVERTISEMENTS = ("litlogger", "LitLogger")


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(word in message for word in _ADVERTISEMENTS)


def quiet_console() -> None:
    """Idempotent; call after Lightning is imported and Hydra has set up logging."""
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        # The root logger (Hydra's console and log file) already shows these records.
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisements) for f in logger.filters):
            logger.addFilter(_DropAdvertisements())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
