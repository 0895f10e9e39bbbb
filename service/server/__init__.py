"""The running server: configuration, wiring (ports, health, reflection, signals, drain), worker
processes, the model-file watcher and the periodic summaries.
"""
