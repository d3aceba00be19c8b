"""Experiment trackers of the io registry: TensorBoard, MLflow, W&B, and what they share."""
