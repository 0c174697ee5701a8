"""samsr.models.components: building blocks shared by CRM and the SAM-SR variants."""

from samsr.models.components.fusion import Fusion
from samsr.models.components.implicit_decoder import ImplicitDecoder, make_coord, query_grid
from samsr.models.components.resnet_encoder import ResNetEncoder

__all__ = ["Fusion", "ImplicitDecoder", "ResNetEncoder", "make_coord", "query_grid"]
