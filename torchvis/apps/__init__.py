"""Applications on top of the library (CLI, demo, explain command, image loading, digits data and
model); ``import torchvis`` does not import them."""
