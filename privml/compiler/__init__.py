"""Compiler pass: capture, validate, calibrate, approximate, plan."""
