"""Transition stores: trajectory JSONL -> one row per (s, a, r, s') with episode semantics.

Modules: ``parse`` (typed, checked parse of chunks of JSONL), ``episodes`` (steps ->
transitions), ``writer`` (column files, Arrow and zarr output), ``build`` (the streaming
build), ``store`` (the memory-mapped reader), ``verify``, ``inspect``, and ``kind`` (what
the command-line tools call).
"""
