"""Presets (YAML) and the model registry (models.yaml); data, read with importlib.resources."""
