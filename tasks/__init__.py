"""The shipped lm-evaluation-harness tasks (YAML and JSON lines), installed as package data."""
