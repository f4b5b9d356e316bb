"""bonnerlab: cluster batch jobs for PyTorch research labs."""
