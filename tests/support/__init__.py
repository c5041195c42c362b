"""Shared test support, importable as ``support.<module>`` (pytest puts tests/ on the path):
one copy of the fixtures several test files used to repeat."""
