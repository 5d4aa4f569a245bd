"""Helpers of ``examples/replicate_solopo.py``: the QA world, the pipeline steps, the report."""
