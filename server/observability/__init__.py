"""Observability of the HTTP process: `request_ids.py` (a request id per HTTP request, in every
log line and engine request id, and the access log), `tracing.py` (OpenTelemetry spans, off by
default) and `metrics.py` (the Prometheus `alignserve:*` metrics).
"""
