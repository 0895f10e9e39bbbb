"""The metrics registry and structured logging, used by every room of the service."""
