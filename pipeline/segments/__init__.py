"""Segment stores: QA documents -> (question, segment) rows for a reader that halts.

Modules: ``sources`` (SQuAD / JSONL records, checked), ``tokenizer`` (train or load a
WordPiece tokenizer), ``build`` (tokenize, window, map answers, write), ``store`` (the
memory-mapped reader), ``verify``, ``inspect``, and ``kind`` (what the command-line tools
call).
"""
