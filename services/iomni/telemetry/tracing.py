"""OpenTelemetry tracing, configured by the standard OTEL_* environment variables.

Tracing is on when OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP(_TRACES)_ENDPOINT is set
(`otlp` by default, `console` for local debugging); otherwise spans are no-ops.
"""

from __future__ import annotations

import os

from opentelemetry import propagate, trace
from opentelemetry.context import Context

_configured = False


def configure(service_name: str) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name in ("", "none") and not endpoint:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer("iomni")


def context_headers(context: Context | None = None) -> dict[str, str]:
    """W3C trace context (of `context`, default the current one) for outgoing requests."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier
