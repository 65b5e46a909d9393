"""megalm: Megatron-style training of GPT models, from raw text to a Hugging Face checkpoint."""

__version__ = "0.1.0"
