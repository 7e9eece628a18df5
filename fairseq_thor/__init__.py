"""fairseq_thor: THOR (Transformer witH StOchastic ExpeRts, Zuo et al., ICLR 2022) for fairseq.

Load with ``--user-dir fairseq_thor`` (or ``--user-dir "$(python -m fairseq_thor.path)"``).
"""
from .compat import allow_fairseq_checkpoint_globals

allow_fairseq_checkpoint_globals()

from . import models  # noqa: F401,E402  (registers thor_transformer and its architectures)
from . import criterions  # noqa: F401,E402  (registers thor_consistency)
from . import tasks  # noqa: F401,E402  (registers translation_thor)
