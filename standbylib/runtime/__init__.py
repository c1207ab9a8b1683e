"""What the roles (standby daemon, primary agent, standbyctl, backup node) share to become services:
configuration and command lines, structured logs, metrics endpoints and gRPC glue.

This is the only part of `standbylib` that imports grpc, structlog or prometheus_client; the engine,
block devices and the NBD protocol stay free of them.
"""

import os

# gRPC's C core logs failed TLS handshakes (and more) at INFO level on stderr, which would break the
# one-line errors of the command-line tools and the JSON log lines of the daemons; the failures reach
# us as call errors anyway. Set before grpc is first imported; an explicit GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
