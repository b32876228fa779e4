"""Benchmark harness for tidebase-agents (see bench/README.md)."""
