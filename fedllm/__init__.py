"""fedllm: federated DP-LoRA fine-tuning of open LLMs on Flower, with per-site privacy ledgers.

Importing this package is cheap: it imports no torch, flwr or ray.
"""

__version__ = "0.1.0"
