"""Deployment: site files, checks, keys and certificates, and starting real Flower processes."""
