"""The registry of image interfaces: `config.image.interface` names one of the keys of `INTERFACES`.

Adding an interface is one file with an `ImageInterface` subclass (`mmgen.interfaces.base`) plus one
line here.
"""

from mmgen.config import ImageConfig, ModelConfig
from mmgen.interfaces.base import ImageInterface
from mmgen.interfaces.diffusion import DiffusionInterface
from mmgen.interfaces.discrete import DiscreteInterface
from mmgen.interfaces.hybrid import HybridInterface
from mmgen.interfaces.mar import MARInterface

INTERFACES: dict[str, type[ImageInterface]] = {
    "diffusion": DiffusionInterface,  # Transfusion
    "discrete": DiscreteInterface,  # Chameleon
    "hybrid": HybridInterface,  # HART
    "mar": MARInterface,  # MAR-style continuous tokens, one after another
}


def interface_class(image: ImageConfig) -> type[ImageInterface]:
    """The class `image.interface` names; raises ValueError for an unknown name."""
    if image.interface not in INTERFACES:
        raise ValueError(f"unknown image interface {image.interface!r}; choose from {sorted(INTERFACES)}")
    return INTERFACES[image.interface]


def check_image_config(image: ImageConfig) -> type[ImageInterface]:
    """The interface class for `image`, after its own check of `image` (ValueError naming the fix)."""
    cls = interface_class(image)
    cls.check_config(image)
    return cls


def build_interface(config: ModelConfig) -> ImageInterface:
    """The model's image interface (its constructor checks the image config)."""
    return interface_class(config.image)(config)
