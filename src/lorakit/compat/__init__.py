"""Compatibility with other LoRA libraries' APIs (Microsoft loralib)."""
