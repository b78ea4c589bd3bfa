"""Output Jacobians and projections onto their span (MinNorm-OG's linear algebra).

``blocks`` holds the per-layer blocks of the hooked projection; ``register_block`` adds one for a
layer type of your own.
"""

from overunlearn.linalg.blocks import Block, RowsBlock, ScaleNormBlock, register_block
from overunlearn.linalg.coverage import ParameterRoute, ProjectionReport, explain_projection
from overunlearn.linalg.jacobian import output_jacobian, output_jacobian_reference, sample_indices
from overunlearn.linalg.projection import (
    JacobianFallbackWarning,
    project_model_onto_span,
    project_onto_span,
    project_onto_span_qr,
)

__all__ = [
    "Block",
    "JacobianFallbackWarning",
    "ParameterRoute",
    "ProjectionReport",
    "explain_projection",
    "RowsBlock",
    "ScaleNormBlock",
    "output_jacobian",
    "output_jacobian_reference",
    "register_block",
    "sample_indices",
    "project_model_onto_span",
    "project_onto_span",
    "project_onto_span_qr",
]
