"""The decode role: a gRPC server (DecodeWorker in protos/splitserve.proto)
that reserves KV blocks, has a prefill worker fill them (or prefills itself),
and streams tokens from its continuously batched engine. In colocated mode it
always prefills itself."""
