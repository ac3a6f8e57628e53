"""Deployment artefacts: the Helm chart (helm/iomni) rendered offline into plain manifests."""
