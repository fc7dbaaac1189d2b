"""The bottom layer: types, config parsing, scenario, data, models, the scheme-agnostic trainer, clock, results.

Imports nothing above it (no agents, analysis or commands; the import contracts in pyproject.toml say so and
tests/test_layers.py checks them), so every layer can build on it and it can be tested alone.
"""
