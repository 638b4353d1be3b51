"""Control plane: the HTTP front, the KV-aware router, the Ray Serve application.

Knows replicas, never GPUs: everything that touches a model runs in
kiln.workers, behind a replica.
"""
