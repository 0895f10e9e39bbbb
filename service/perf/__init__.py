"""Load testing and benchmarks. They talk to a server over the wire, through the generated stubs,
and never import the server's internals; only the CLI imports this package.
"""
