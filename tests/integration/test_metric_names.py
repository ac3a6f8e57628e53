"""The metrics the Helm chart's autoscalers, alerts and dashboards use are the ones the running
services really expose (scraped here from a live gateway, a live turn worker and a live Triton)."""

from __future__ import annotations

import json
import re
import urllib.request

from tests.helm.test_chart import (
    DASHBOARDS,
    EXTERNAL,
    _alert_exprs,
    _exprs,
    _keda_queries,
    _label_values,
    docs,
    promql_metrics,
)
from tests.integration.conftest import GatewayProcess

SUFFIX = re.compile(r"(_bucket|_count|_sum)$")


def scrape(url: str) -> set[str]:
    """Metric family names announced on a /metrics page (HELP lines exist before any sample)."""
    with urllib.request.urlopen(url) as response:
        text = response.read().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}


def referenced() -> set[str]:
    objs = docs("cpu")
    exprs = [*_keda_queries(objs), *_alert_exprs(objs)]
    for path in DASHBOARDS:
        exprs += [_label_values(e) for e in _exprs(json.loads(path.read_text()))]
    names = set().union(*(promql_metrics(e) for e in exprs))
    return {SUFFIX.sub("", name) for name in names} - set(EXTERNAL)


def test_chart_metrics_exist_on_the_live_services(
    gateway: GatewayProcess,
    triton,
    start_worker,  # type: ignore[no-untyped-def]
) -> None:
    worker = start_worker()
    live = scrape(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    live |= scrape(f"http://127.0.0.1:{triton.ports.metrics}/metrics")
    live |= scrape(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    families = {SUFFIX.sub("", name) for name in live}
    # prometheus_client announces counters without their _total suffix in HELP lines.
    families |= {f"{name}_total" for name in families}
    wanted = referenced()
    missing = sorted(wanted - families)
    assert not missing, f"the chart uses metrics no live service exposes: {missing}"
    assert any(n.startswith("iomni_gateway_") for n in wanted)
    assert any(n.startswith("iomni_worker_") for n in wanted)
    assert any(n.startswith("nv_inference_") for n in wanted)
