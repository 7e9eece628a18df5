"""The THOR mechanism, usable without fairseq's command-line tools."""
from .experts import ExpertLinear, routed  # noqa
from .routing import Route, make_route  # noqa
