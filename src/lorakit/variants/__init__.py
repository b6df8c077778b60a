"""LoRA variants on top of the core layers: DoRA, PiSSA (initialisation and conversion), QLoRA (a 4-bit base)."""
