"""The prefill role: a gRPC server (PrefillWorker in protos/splitserve.proto)
that computes prompts' KV, answers the first token at once, and ships the KV
to the decode worker that asked."""
