"""The dialogue gateway: the gRPC front door that runs turns over Triton with Redis state."""
