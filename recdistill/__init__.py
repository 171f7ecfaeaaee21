"""recdistill: staged distillation of recommender ranking models."""

import logging

# Importing torchrec trips a torch.fx notice addressed to torch's own developers.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

__version__ = "0.1.0"
