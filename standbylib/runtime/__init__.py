"""What the roles (standby daemon, primary agent, standbyctl, backup node) share to become services:
configuration and command lines, structured logs, metrics endpoints and gRPC glue.

This is the only part of `standbylib` that imports grpc, structlog or prometheus_client; the engine,
block devices and the NBD protocol stay free of them.
"""
