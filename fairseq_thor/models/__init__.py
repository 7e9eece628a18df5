from .thor_transformer import ThorTransformerModel  # noqa: F401  (registers thor_transformer)
from . import architectures  # noqa: F401,E402  (registers the thor_transformer_* architectures)
