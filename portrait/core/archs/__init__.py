"""Adapter architectures and their checkpoint detection by state-dict keys (pure torch, no
pipeline knowledge): each module exposes `detect(keys) -> bool` and a builder from a state
dict, like diffusers' models/ and spandrel's arch + detect pairs. Backends import them."""
