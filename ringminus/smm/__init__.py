"""System Management Mode (ring -2): the SMRAM state-save maps (layouts.py), SMI entry and RSM."""
