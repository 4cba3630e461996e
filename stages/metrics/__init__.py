"""Evaluation code shared by stages."""
