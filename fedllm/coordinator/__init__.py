"""The coordinator's side: the round loop, screening of replies, central-DP accounting, the
resume checkpoint and the run history."""
