from .translation_thor import ThorTranslationTask  # noqa: F401  (registers translation_thor)
