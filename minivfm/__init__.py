"""minivfm: visual foundation models, rebuilt from scratch for teaching."""

from minivfm.profiles import PROFILES, configure_threads, pick, profile

__version__ = "0.1.0"
__all__ = ["PROFILES", "configure_threads", "pick", "profile", "__version__"]
