"""Adapter architectures and their checkpoint detection (pure torch, no pipeline knowledge).

One module per family, each with `detect(keys) -> bool` and builders from a state dict, in
the manner of diffusers' `models/` and spandrel's arch + detect pairs. Backends
(portrait.stages.backends) import these; nothing here imports a stage.
"""
