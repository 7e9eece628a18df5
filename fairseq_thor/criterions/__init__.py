from .moe_cross_entropy import MoECrossEntropyCriterion  # noqa: F401  (registers moe_label_smoothed_cross_entropy)
from .thor_consistency import ThorConsistencyCriterion  # noqa: F401  (registers thor_consistency)
