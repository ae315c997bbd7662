"""Flower glue, and the only package that imports ``flwr``: the ClientApp and ServerApp, Flower
strategies, and the Flower processes (SuperLink, SuperNode, ``flwr run``) fedllm starts and stops."""
