"""Shipped Hugging Face ``config.json`` files of the LLMs the simulators know by name."""
