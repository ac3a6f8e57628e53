"""Benchmarks and load tests (never run by `make test`)."""

import os

# The harnesses fork servers (subprocess with a preexec_fn) while their own gRPC clients run.
# With gRPC's fork support on, its handlers run in the child and aborted one now and then
# (`ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED`, a chaos run); the children
# exec at once and need none of it. `python -m loadtests.x` imports this before grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
