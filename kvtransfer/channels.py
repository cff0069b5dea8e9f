"""gRPC options for every connection between router, decode and prefill
workers: one list, for channels and servers alike (each end reads the keys
that concern it and ignores the others).

Keepalive is what notices a peer that vanished without closing its
connection (frozen, partitioned, its host gone): a stream that waits for
such a peer's next message (router <- decode while tokens are due, decode
<- prefill before the first token) has no other end. Both ends ping every
KEEPALIVE_TIME_MS, also while no call is open and no data moves, and drop
the connection, failing its calls with UNAVAILABLE, when a ping goes
unanswered for KEEPALIVE_TIMEOUT_MS. Servers accept pings that often
(gRPC's default policy answers a client pinging more than every 5 minutes
with GOAWAY "too_many_pings", which would kill the very streams keepalive
is meant to protect).
"""

from __future__ import annotations

from typing import Any

# Large enough for a max-size KV chunk plus its header, with room to spare
# (gRPC's default limit is 4 MiB).
MAX_MESSAGE_BYTES = 64 << 20

# A vanished peer is noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS
# of its last sign of life.
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000
# A peer that accepts the TCP connection but never completes the HTTP/2
# handshake (frozen, overloaded) fails the attempt after this long.
CONNECT_TIMEOUT_MS = 5_000

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Both ends: ping this often, give up on the connection after this long
    # without an answer, also with no call open, and with no limit on pings
    # sent while no data moves (gRPC's default stops after 2).
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_time_between_pings_ms", KEEPALIVE_TIME_MS),
    # grpcio 1.85 waits this long for any ping's ack (default 60 s) whatever
    # keepalive_timeout_ms says: measured, a frozen peer took 65 s without it.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # Servers: accept the peers' pings at that rate (a ping sooner than this
    # after the previous one is a "strike"; a few strikes end the connection).
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    # Channels: a worker that restarts must be reachable again within a poll
    # or two, not after gRPC's default reconnect backoff (up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # ...but each connection attempt gets CONNECT_TIMEOUT_MS to finish its
    # handshake (despite its name, gRPC reads this key as the minimum connect
    # timeout): a loaded peer is not given up after 100 ms.
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
]
SERVER_OPTIONS = CHANNEL_OPTIONS  # the same list: see the module docstring
