"""Wire schema of the appliance: generated from proto/v1 by scripts/protogen.py (`make proto`).

`standbylib.rpc.v1` holds the protobuf messages (`*_pb2`) and gRPC stubs and servicers (`*_pb2_grpc`)
of the Replication and Control services, package `standbyappliance.v1`.
"""

import os

# gRPC's C core logs failed TLS handshakes (and more) at INFO level on stderr, which would break the
# one-line errors of the command-line tools and the JSON log lines of the daemons; the failures reach
# us as call errors anyway. Set before grpc is first imported; an explicit GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
