"""Generated gRPC and protobuf modules (scripts/protogen.py); do not edit."""
