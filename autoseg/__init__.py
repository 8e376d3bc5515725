"""autoseg: self-configuring segmentation for liver and kidney tumours in CT."""

__version__ = "0.1.0"
