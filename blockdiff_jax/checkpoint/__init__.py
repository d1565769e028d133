"""Checkpoint I/O (Orbax) and loading a trained model for inference."""
