"""TPI: tensor-parallel LLM inference on a cluster of edge devices.

The package is a pure library: model maths, shard plans, weights, communicators.
Services (master, worker, web UI) are thin wrappers that import it.
"""
