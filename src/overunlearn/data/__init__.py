"""Dataset sources (torchvision roots, Debian Fashion-MNIST, scikit-learn digits) and colouring.

>>> from overunlearn.data import load_images
>>> train = load_images("digits", "train")     # always available
>>> train.images.shape                        # uint8 (N, 1, 28, 28)
"""

from overunlearn.data.color import COLLAPSE_PALETTE, ERASE_PALETTE, FULL_GRAY, ColoredImages, colorize, intensity
from overunlearn.data.prepare import prepare_fashion_mnist
from overunlearn.data.sources import (
                                    ImageSet,
                                    canonical_name,
                                    dataset_location,
                                    default_data_root,
                                    get_source,
                                    list_sources,
                                    load_images,
)

__all__ = ["COLLAPSE_PALETTE", "ERASE_PALETTE", "FULL_GRAY", "ColoredImages", "colorize", "intensity",
           "prepare_fashion_mnist", "ImageSet", "canonical_name", "dataset_location", "default_data_root",
           "get_source", "list_sources", "load_images"]
