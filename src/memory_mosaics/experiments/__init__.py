"""Experiments that reproduce the paper's claims with the project's own code (`mosaic reproduce`)."""
