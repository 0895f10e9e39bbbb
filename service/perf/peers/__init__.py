"""What `digits bench` holds the server against: the do-nothing v2 servicer (the floor), MLServer, and
the clients others use on us (tritonclient.grpc.aio, Triton's perf_analyzer)."""
