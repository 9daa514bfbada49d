"""REFINE-AF as a Dagster asset graph.

Every module in this package except definitions.py is plain Python with no dagster import, so each
algorithm can be used and tested without the orchestrator.
"""
