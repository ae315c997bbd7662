"""The coordinator's side: the round loop over a small protocol of plain types (``protocol.py``;
no Flower), screening of replies, central-DP accounting, the resume checkpoint and the run history."""
