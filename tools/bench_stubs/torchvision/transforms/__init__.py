"""Stub of ``torchvision.transforms``."""
