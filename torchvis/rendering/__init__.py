"""Raw maps to pictures: normalise, colour, overlay, grid, figure — tensors in [0, 1], no I/O."""
