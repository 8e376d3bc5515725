"""Training: data loading and augmentation, loss, folds, the training loop and its validation."""
