"""Attack tests (issue 8): key oracles and the structural panel against pre-aes, on trained weights."""
