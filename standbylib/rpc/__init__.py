"""Wire schema of the appliance: generated from proto/v1 by scripts/protogen.py (`make proto`).

`standbylib.rpc.v1` holds the protobuf messages (`*_pb2`) and gRPC stubs and servicers (`*_pb2_grpc`)
of the Replication and Control services, package `standbyappliance.v1`.
"""
