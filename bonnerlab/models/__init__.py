"""Model sources, the MNIST CNN, weights files and each source's published preprocessing."""
