"""The shared fixtures, by concern; tests/conftest.py registers every module."""
