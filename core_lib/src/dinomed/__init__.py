"""DINOv3 foundation models for PET/CT and CT segmentation."""
__version__ = "0.1.0"
