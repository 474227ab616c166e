"""Benchmarks of the real stages on synthetic consortia of growing size.

``python -m benchmarks.run --size small|100k|1m`` — see ``docs/benchmarks.md``.
"""
