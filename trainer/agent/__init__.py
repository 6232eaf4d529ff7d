"""Student training on sequence stores (``kind: sequences``): SFT / SAD with span-weighted
loss, LoRA and mixed precision, on any causal LM of ``transformers`` (:mod:`trainer.agent.runner`)."""
