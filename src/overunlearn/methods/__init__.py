"""Unlearning methods, one concept per module, registered by name.

>>> from overunlearn.methods import create, list_methods
>>> m = create("minnorm_og", lr=1e-3, reg_coef=0.1)
"""

from overunlearn.methods import ascent, descent, distill, minnorm_og, saliency, uniform  # noqa: F401  (register)
from overunlearn.methods.base import Method, MethodConfig
from overunlearn.methods.minnorm_og import MinNormOG, MinNormOGConfig
from overunlearn.methods.registry import create, get_method, list_methods, register_method

__all__ = ["Method", "MethodConfig", "MinNormOG", "MinNormOGConfig", "create", "get_method", "list_methods",
           "register_method"]
