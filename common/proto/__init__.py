"""Generated protobuf/gRPC code for protos/fedmoe.proto (run `make protos` to refresh)."""

from . import fedmoe_pb2 as pb
from . import fedmoe_pb2_grpc as rpc

__all__ = ["pb", "rpc"]
