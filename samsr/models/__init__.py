"""samsr.models: the refinement networks and their losses."""

from samsr.models.crm import CRM, build_crm
from samsr.models.crm_official import convert_official_crm, load_official_crm
from samsr.models.losses import RefinementLoss
from samsr.models.sam_crm import SamCRM, build_sam_crm

__all__ = [
    "CRM",
    "RefinementLoss",
    "SamCRM",
    "build_crm",
    "build_sam_crm",
    "convert_official_crm",
    "load_official_crm",
]
