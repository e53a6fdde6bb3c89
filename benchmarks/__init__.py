"""Benchmark harness for sbi-fm-plugin (not part of the installed package)."""
