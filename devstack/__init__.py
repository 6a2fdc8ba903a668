"""Development stack: network namespaces, coturn, the development portal, the gateway and
development clients, wired together on one machine.

Used by the demo (``python -m devstack.demo``), the end-to-end tests and the benchmarks.
Everything it creates lives in network namespaces it names with the process id, and is
removed again; it sends nothing outside them.
"""
