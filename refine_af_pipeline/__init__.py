"""REFINE-AF as a Dagster asset graph.

Every module in this package except definitions.py (the Definitions) and run_launcher.py (the
instance's run launcher, named in dagster.yaml) is plain Python with no dagster import, so each
algorithm can be used and tested without the orchestrator.
"""
