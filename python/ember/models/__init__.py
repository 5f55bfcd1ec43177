"""Decoder-only model definitions and checkpoint loaders."""
