"""Pipeline stages: one module per stage; each imports only portrait.core."""
