"""Image interfaces: how image tokens enter and leave the backbone (see `base.ImageInterface`)."""

from mmgen.interfaces.diffusion import DiffusionInterface
from mmgen.interfaces.discrete import DiscreteInterface
from mmgen.interfaces.hybrid import HybridInterface
from mmgen.interfaces.mar import MARInterface

INTERFACES = {
    "diffusion": DiffusionInterface,  # Transfusion
    "discrete": DiscreteInterface,  # Chameleon
    "hybrid": HybridInterface,  # HART
    "mar": MARInterface,  # MAR-style continuous tokens, one after another
}
