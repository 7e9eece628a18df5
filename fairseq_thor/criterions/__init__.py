from .thor_consistency import ThorConsistencyCriterion  # noqa: F401  (registers thor_consistency)
