"""Batch studio: durable, resumable jobs (identities x templates x counts).

spec.py      the job spec (pydantic) and its expansion into items with content ids
store.py     the SQLite (WAL) store: claims, leases, retries, crash recovery
executor.py  the seam to the flows (train, generate) and how outputs get into place
runner.py    local workers that keep models warm (`--workers N`)
ray_runner.py  the same on Ray actors (`--ray ADDRESS`)
progress.py  the live per-item view, read from the store
api.py       `portrait.Studio`
"""
