"""lpcam_adapters: one module of glue per host (IRN, ReCAM, AMN, MCTformer); see docs/hosts/."""

from lpcam_core.logs import add_logger

add_logger(__name__)
