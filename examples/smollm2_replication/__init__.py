"""Helpers of ``examples/replicate_smollm2.py``: the biography world, the pipeline steps, the units, the statistics, the report."""
