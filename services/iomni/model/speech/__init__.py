"""The speech decoder: speech-token LM, flow matching, HiFT vocoder."""
