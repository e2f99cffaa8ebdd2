"""Instruction decoding for the instructions ringminus handles itself."""
