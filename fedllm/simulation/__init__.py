"""Simulation mode: scenario folders into simulated runs on Flower's simulation engine."""
