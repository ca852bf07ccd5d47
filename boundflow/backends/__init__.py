"""Compiler backends for BoundFlow's executors (each optional, imported only when used)."""
