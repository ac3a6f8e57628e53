"""Render the Helm chart in helm/iomni offline and write the plain manifests under k8s/.

k8s/<profile>/ is generated from the chart, never edited by hand: `make k8s` rewrites it and
the test suite fails when it drifts from the chart. Rendering uses helm-python-sdk (Helm v4's
SDK through ctypes), so no helm binary and no cluster are needed.

    python -m iomni.deploy.render --profile cpu --out k8s/cpu
    python -m iomni.deploy.render --all              # every profile into k8s/<profile>
    python -m iomni.deploy.render --all --check      # exit 1 when k8s/ is stale
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART_DIR = REPO_ROOT / "helm" / "iomni"
K8S_DIR = REPO_ROOT / "k8s"
PROFILES = ("cpu", "gpu", "minimal")
RELEASE = "iomni"
NAMESPACE = "iomni"
HEADER = (
    "# GENERATED from helm/iomni (profile {profile}, release {release}, namespace {namespace})"
    " by `make k8s`.\n# Do not edit: change the chart and regenerate.\n"
)


def profile_values(profile: str, chart_dir: Path = CHART_DIR) -> dict[str, Any]:
    """The values file of a profile (helm/iomni/values-<profile>.yaml)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return yaml.safe_load((chart_dir / f"values-{profile}.yaml").read_text()) or {}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge like Helm's -f a.yaml -f b.yaml: mappings merge, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(
    values: dict[str, Any] | None = None,
    *,
    profile: str | None = None,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    chart_dir: Path = CHART_DIR,
) -> dict[str, str]:
    """Template path -> rendered text, for a profile's values with `values` merged on top.

    Raises helm_python.HelmValuesError (schema) or HelmRenderError (a template's `fail`)."""
    import helm_python

    merged = profile_values(profile, chart_dir) if profile else {}
    merged = merge(merged, values or {})
    with helm_python.Chart.load(str(chart_dir)) as chart:
        return chart.render(merged, name=release, namespace=namespace, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt and empty documents left out)."""
    out = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        out.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return out


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (dashboards, scripts), stable key order."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def dump(docs: Iterable[dict[str, Any]]) -> str:
    return yaml.dump_all(
        list(docs), Dumper=_Dumper, sort_keys=False, width=100, explicit_start=True
    )


def manifests(
    profile: str, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """File name -> content of k8s/<profile>/: one file per template, plus kustomization.yaml."""
    rendered = render(profile=profile, release=release, namespace=namespace)
    header = HEADER.format(profile=profile, release=release, namespace=namespace)
    files: dict[str, str] = {}
    for path in sorted(rendered):
        if not path.endswith(".yaml"):
            continue
        docs = [d for d in yaml.safe_load_all(rendered[path]) if d]
        if docs:
            files[Path(path).name] = header + dump(docs)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": sorted(files),
    }
    files["kustomization.yaml"] = header + yaml.safe_dump(kustomization, sort_keys=False)
    return files


def write(profile: str, out: Path) -> list[Path]:
    """Replace out/ with the profile's manifests; returns the files written."""
    files = manifests(profile)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def drift(profile: str, out: Path) -> list[str]:
    """Names of files in out/ that differ from a fresh render (missing, extra or changed)."""
    files = manifests(profile)
    present = {p.name for p in out.glob("*.yaml")} if out.is_dir() else set()
    problems = [f"{name} is extra" for name in sorted(present - set(files))]
    for name, text in files.items():
        path = out / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.read_text() != text:
            problems.append(f"{name} differs")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iomni.deploy.render", description="helm/iomni -> k8s/<profile>/"
    )
    parser.add_argument("--profile", choices=PROFILES, action="append", default=[])
    parser.add_argument("--all", action="store_true", help="every profile into k8s/<profile>")
    parser.add_argument("--out", type=Path, help="output directory (one --profile only)")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    profiles = list(PROFILES) if args.all else args.profile
    if not profiles:
        parser.error("give --profile NAME or --all")
    if args.out and len(profiles) != 1:
        parser.error("--out needs exactly one --profile")
    status = 0
    for profile in profiles:
        out = args.out or K8S_DIR / profile
        if args.check:
            problems = drift(profile, out)
            for problem in problems:
                print(f"{out}/{problem}", file=sys.stderr)
            if problems:
                status = 1
        else:
            for path in write(profile, out):
                print(path)
    if status:
        print("k8s/ is stale: run `make k8s`", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
