"""Batch studio: durable, resumable jobs."""
