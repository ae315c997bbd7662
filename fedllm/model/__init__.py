"""The base model: loading it and its tokenizer, LoRA adapters and their state, the catalog of
tested model families."""
