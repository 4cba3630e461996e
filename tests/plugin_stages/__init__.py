"""Stages used by the tests to exercise the runner (retries, failures, placement)."""
