"""Datasets, the folder scanner, loaders and batched augmentation."""
