"""Stub of ``torchvision.datasets``: only the name ``streaming.vision`` imports."""

from torch.utils.data import Dataset


class VisionDataset(Dataset):  # type: ignore[type-arg]
    """Placeholder base class; the benchmark never builds a vision dataset."""
