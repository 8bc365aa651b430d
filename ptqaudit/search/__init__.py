"""Searching bit-width policies: the space and budget, RL and baseline methods, ORT verification."""
