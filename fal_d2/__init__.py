"""fal_d2: FPN-ABN Layered networks (FAL) for Detectron2."""
