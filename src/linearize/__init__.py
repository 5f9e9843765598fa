"""linearize: how linear is each layer of a transformer decoder, and what to do about it.

Implements the analysis of "Your Transformer is Secretly Linear" (Razzhigaev et al., 2024)
from streaming float64 statistics, for any Hugging Face decoder-only causal LM.
"""

from linearize._version import __version__
from linearize.analyze import analyze, analyze_model
from linearize.errors import LinearizeError
from linearize.linearity import LinearityReport
from linearize.models import load

__all__ = ["LinearityReport", "LinearizeError", "analyze", "analyze_model", "load", "__version__"]
