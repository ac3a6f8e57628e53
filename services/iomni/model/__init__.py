"""InteractiveOmni in PyTorch: every part of the model, its processor and checkpoints."""
