"""Layers built on lowrank_ops.ops."""
