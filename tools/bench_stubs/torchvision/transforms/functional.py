"""Stub of ``torchvision.transforms.functional``: only the name ``streaming.vision`` imports."""

from typing import Any


def to_tensor(pic: Any) -> Any:
    """Refuse: images are not part of the text benchmark."""
    raise NotImplementedError("torchvision stub: images are not part of the text benchmark")
