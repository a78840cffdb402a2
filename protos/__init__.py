"""splitserve.protos: the worker gRPC API (package splitserve.v1).

worker.proto is the source; worker_pb2.py, worker_pb2_grpc.py and worker_pb2.pyi are generated
from it by protos/generate.py and committed (tests/protos fails when they are stale). convert.py
maps wire messages to the in-process types (SamplingParams) and back.
"""

#: Version of the worker API, sent in Handshake and Health (PeerInfo/HealthReply.protocol_version).
#: Bump it on any change a peer of the previous version would misread.
PROTOCOL_VERSION = 1
