"""What the two worker roles (prefill_worker/, decode_worker/) share: one
process lifecycle (`process`: arguments, engine loading, health, signals,
drain), the mapping between the engine's types and the wire messages
(`wire`, which the router uses too), and the Status answer (`status`)."""
