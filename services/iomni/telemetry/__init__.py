"""Metrics (Prometheus) and traces (OpenTelemetry) shared by every service."""
