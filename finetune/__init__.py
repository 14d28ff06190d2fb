"""finetune: fine-tune Hugging Face checkpoints on GLUE, summarization and translation."""

__version__ = "0.1.0"
