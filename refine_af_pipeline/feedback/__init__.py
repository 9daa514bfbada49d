"""Automated feedback: the component scorers, judge models, combined reward and its calibration."""
