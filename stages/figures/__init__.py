"""Figures the stages write: PNG grids of images."""
