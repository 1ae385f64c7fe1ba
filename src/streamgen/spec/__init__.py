"""Speculative decoding: draft token trees, drafters, and lossless acceptance.

Torch-free at import (the scheduler builds and cuts trees); the acceptance
rules in :mod:`streamgen.spec.acceptance` and the model drafters import torch.
"""

from streamgen.spec.drafter import Drafter, DraftInput
from streamgen.spec.ngram import NgramDrafter
from streamgen.spec.tree import ROOT, DraftTree

__all__ = ["ROOT", "DraftInput", "DraftTree", "Drafter", "NgramDrafter"]
