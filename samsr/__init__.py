"""samsr: high-resolution segmentation refinement (CRM and the SAM-SR variants)."""

__version__ = "0.1.0"
