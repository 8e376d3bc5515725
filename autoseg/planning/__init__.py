"""Planning: the dataset fingerprint and the configurations planned from it."""
