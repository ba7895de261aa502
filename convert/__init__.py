"""Checkpoint conversion between HF/torch/PEFT and GGUF, and quantization."""
