"""Adapter files: PEFT's format (save, read, load) and atomic writes."""
