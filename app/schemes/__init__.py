"""RELION-4-compatible Schemes: scheme.star/job.star model, operators, the schemer loop (no Qt)."""
