"""Byte-level language-model fine-tuning study: Python source -> English prose."""
