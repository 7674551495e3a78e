"""fal_d2 engine: training-loop pieces for Detectron2's trainers."""
from .exact_resume import ExactResume, ExactResumeMixin

__all__ = ["ExactResume", "ExactResumeMixin"]
