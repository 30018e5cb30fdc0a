"""Deployment YAMLs. A package only so that the embedded default, `local.yaml`, ships in the
wheel as package data and is found from any directory."""
