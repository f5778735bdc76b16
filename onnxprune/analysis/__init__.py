"""Analyses shared by passes (weights, dependency groups, attention, calibration)."""
