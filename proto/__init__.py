"""Wire protocol: the .proto sources, generated gRPC stubs, and `wire` helpers for servers, channels and chunked streams."""
