"""Flower glue, and the only package that imports ``flwr``: the ClientApp and ServerApp, the
coordinator's Federation over Flower's Grid (``grid.py``), Flower's strategies and DP wrappers
with their adapter to the coordinator's Strategy protocol and their saved state, and the Flower
processes (SuperLink, SuperNode, ``flwr run``) fedllm starts and stops."""
