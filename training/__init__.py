"""Training, evaluation and phantom data for ichnode's hemorrhage model."""
