"""Other tools' formats: Minari datasets in (``source.format: minari``) and out
(``python -m pipeline.export``), d3rlpy replay buffers and Hugging Face datasets out."""
