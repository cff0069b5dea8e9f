"""Moving a prompt's KV blocks from a prefill worker to a decode worker.

`base` holds the transport-free part: the chunk, the sender interface and the
receiver that validates chunks against reservations and writes them into
blocks. `grpc_backend` carries chunks over the Prefill stream of
protos/splitserve.proto; `channels` holds the gRPC options (keepalive,
message size, reconnects) of every connection between router and workers;
`security` who may call a worker (the cluster's secret, mTLS) and which
prefill workers a decode worker may dial.

Import from the modules themselves: the router uses `channels` and
`security` without paying torch's import, which `base` needs.
"""
