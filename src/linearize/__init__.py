"""linearize: how linear is each layer of a transformer decoder, and what to do about it.

Implements the analysis of "Your Transformer is Secretly Linear" (Razzhigaev et al., 2024)
from streaming float64 statistics, for any Hugging Face decoder-only causal LM.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("linearize")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

from linearize.analyze import LinearityReport, analyze, analyze_model  # noqa: E402
from linearize.errors import LinearizeError  # noqa: E402
from linearize.models import load  # noqa: E402

__all__ = ["LinearityReport", "LinearizeError", "analyze", "analyze_model", "load", "__version__"]
