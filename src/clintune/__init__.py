"""clintune: is SFT enough, or does DPO repay its compute? Clinical NLP fine-tuning studies."""

__version__ = "0.1.0"
