"""The foundation layer: types, errors, settings, the model registry and door, face analysis,
architectures (archs/), file formats (formats/) and the tiny stand-ins (tiny/). Nothing here
imports a stage, a flow, the service or the CLI (docs/ARCHITECTURE.md#layers)."""
