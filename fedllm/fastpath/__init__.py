"""Value-equal, faster forms of the frozen base's layers for training (``train.fast-path``)."""
