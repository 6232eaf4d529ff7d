"""The sequence store kind (``kind: sequences``): language-agent episodes as one token
sequence per episode with a label per token; see docs/FORMAT.md ("Sequence store")."""
