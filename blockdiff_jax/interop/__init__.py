"""Pretrained models in and out: Hugging Face folders, GGUF, tokenizers, MASK token."""
