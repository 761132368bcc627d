"""Reproducible experiments: one module per ``djinn bench`` name, each with ``main(argv)``."""
