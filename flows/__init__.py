"""Prefect flows of mfpipe: thin tasks around the library (`mfpipe.pipeline`), nothing that computes."""
