"""One site's side of a round: its runtime (policy, data, ledger), the local DP training loop and
evaluation, and the store that re-sends a released update."""
