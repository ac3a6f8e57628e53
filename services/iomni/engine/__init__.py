"""One dialogue turn, independent of how the model parts are reached (in-process or Triton)."""
