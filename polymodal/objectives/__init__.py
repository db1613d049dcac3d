"""What a training stage optimises: objectives behind one Protocol (base.py), registered in
`registry.OBJECTIVES` by the modules imported here (discovery imports this package)."""

from polymodal.objectives import autoencoder, contrastive, forecast, lm
from polymodal.objectives.base import Objective, StepLoss, objective_for

__all__ = ["Objective", "StepLoss", "autoencoder", "contrastive", "forecast", "lm", "objective_for"]
