"""Operating the daemon: systemd notifications, the status file, Prometheus metrics, structured logs, pseudonyms.

Nothing here opens a socket or configures logging on import; `metrics.serve_metrics` listens only when the user
asked for it (`--metrics`), and only on 127.0.0.1 or a Unix socket.
"""
