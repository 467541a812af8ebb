"""Prompts: the built-in sets and user files (`prompts`), attack templates (`attacks`), the deterministic
splits of a run (`splits`) and chat formatting (`chat`). Above the configuration; below everything that runs a model."""
