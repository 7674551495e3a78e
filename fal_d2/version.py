"""fal_d2's version: the one place it is written (setup.py reads it from here without importing
fal_d2, which needs Detectron2); outputs record it so that results can be traced to the code."""
__version__ = "0.1.0"
