"""Training: patches with augmentation, and the released recipe's loop."""
