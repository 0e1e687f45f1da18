"""Analyses that read the package from outside: the calibration report and the measured success table."""
