"""The core: LoRA maths (functional), configuration, the layers and their injection into a model."""
