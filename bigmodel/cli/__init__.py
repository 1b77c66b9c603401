"""Thin command-line fronts over library functions."""
