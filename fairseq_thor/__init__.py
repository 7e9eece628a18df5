"""fairseq_thor: THOR (Transformer witH StOchastic ExpeRts, Zuo et al., ICLR 2022) for fairseq.

Load with ``--user-dir fairseq_thor`` (or ``--user-dir "$(python -m fairseq_thor.path)"``).
"""
from .compat import allow_fairseq_checkpoint_globals, quiet_known_deprecations

quiet_known_deprecations()  # before fairseq imports fairscale (see compat)

from . import checkpoint_files, early_stopping, restore_file  # noqa: E402
from .errors import install_one_line_errors  # noqa: E402

allow_fairseq_checkpoint_globals()
checkpoint_files.install()  # atomic checkpoint_last copies, verified loads (see checkpoint_files)
early_stopping.install()  # --patience survives a resume (see early_stopping)
restore_file.install()  # an explicit --restore-file that names nothing stops the run (see restore_file)
install_one_line_errors()  # the plugin's own errors end a command with one line

from . import models  # noqa: F401,E402  (registers thor_transformer and its architectures)
from . import criterions  # noqa: F401,E402  (registers thor_consistency)
from . import tasks  # noqa: F401,E402  (registers translation_thor)
