"""Output Jacobians and projections onto their span (MinNorm-OG's linear algebra)."""

from overunlearn.linalg.jacobian import output_jacobian, output_jacobian_reference, sample_indices
from overunlearn.linalg.projection import project_model_onto_span, project_onto_span, project_onto_span_qr

__all__ = [
    "output_jacobian",
    "output_jacobian_reference",
    "sample_indices",
    "project_model_onto_span",
    "project_onto_span",
    "project_onto_span_qr",
]
