"""The protocol-free recognition core: model metadata (the contract with training), model loading,
the MNIST preprocessing recipe, the dynamic batcher and the Recognizer. It imports no protocol
adapter and no server module; only `service.telemetry` (the metrics registry) from outside itself.
"""
