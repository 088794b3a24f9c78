"""Adapter and network architectures, each paired with its checkpoint detection by state-dict keys.

Pure torch, no pipeline knowledge (like diffusers models/ and spandrel arch+detect pairs):
each module exposes `detect(keys) -> bool` and a builder from a state dict. Backends import
them; an arch never imports stages.
"""
