"""Models: loading (the embedded model, HF ids, local directories), references and LoRA adapters."""
