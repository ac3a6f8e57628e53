"""InteractiveOmni serving platform."""
