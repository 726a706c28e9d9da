"""Helpers shared by test layers (importable as ``tests.support``; pytest puts the repo root on sys.path)."""
