"""The gRPC contracts (splitserve.proto) and their generated stubs.

Only the workers' and the router's server/client modules import these types.
"""
