"""Corpus preparation scripts (prepare.py, boundaries.py); importable so tests can call them."""
