"""Synthetic consortium: realistic, reproducible landing batches with known defects.

See :func:`generate_consortium`.
"""

from jobs.generate.consortium import GenerationError, GenerationSummary, generate_consortium

__all__ = ["GenerationError", "GenerationSummary", "generate_consortium"]
