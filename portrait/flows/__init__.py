"""Orchestration: each flow composes stages for one front-door verb (prepare, train, generate, finish)."""
