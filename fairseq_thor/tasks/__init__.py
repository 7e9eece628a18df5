from .translation_thor import ThorTranslationTask  # noqa: F401  (registers translation_thor)
from .multilingual_thor import MultilingualThorTask  # noqa: F401  (registers translation_multi_simple_epoch_thor)
