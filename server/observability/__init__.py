"""Request ids and access logs, Prometheus metrics, log formatting."""
