"""Transferability and feature extraction (features.py: Ray Data batch inference)."""
