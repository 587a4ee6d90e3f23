"""regioncl: self-supervised pretraining for object detection, from raw images to paper tables."""

__version__ = "0.1.0"
