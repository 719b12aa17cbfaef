"""Turning a GQA model into MLA: low-rank factors, calibration, layer-wise refinement, export."""
