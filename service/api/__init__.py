"""Thin protocol adapters over the recognition core: `digits.v1` gRPC, the Open Inference Protocol
over gRPC and REST, `/v1/recognize` and the draw-a-digit page. They translate wire formats to the
core's plain types and map the core's errors to status codes; nothing else.
"""
