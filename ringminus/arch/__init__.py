"""Architectural facts — exception vectors, SVM exit codes, control-register rules, segment
attributes, register orders, CPU models.  No state, and no import from the rest of
ringminus: every other package may build on this one."""
