"""End-to-end benchmarks of ``ember.LLM`` (``python -m bench e2e``): single-stream decode
against the weight-bandwidth roofline and batch throughput, each against transformers'
``generate`` in the same run. See suite.py."""

from bench.e2e import suite  # noqa: F401  (registers the suite)
