"""Small helpers shared by fal_d2's modules."""
