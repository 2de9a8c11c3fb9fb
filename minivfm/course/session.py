"""What the first cell of every lesson calls: :func:`start`."""

from __future__ import annotations

import logging
import warnings

from minivfm.profiles import configure_threads, profile


def _no_tip(record: logging.LogRecord) -> bool:
    return "💡 Tip" not in record.getMessage()


def start(threads: int | None = None) -> str:
    """Set up a lesson's kernel; returns the active profile.

    - torch threads: ``threads``, else one under ``ci`` (tiny models: one thread beats two fighting
      over small ops), else the idle cores (:func:`minivfm.configure_threads`);
    - keeps machine-specific lines out of the stored outputs: Lightning's advertisements for its
      cloud products, a deprecation note that depends on the installed torch and Lightning pair,
      tqdm's note that ipywidgets is missing, and Lightning's warning that an epoch has fewer batches
      than its logging interval (the lessons log metrics once per epoch).
    """
    name = profile()
    configure_threads(threads if threads is not None else 1 if name == "ci" else None)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_tip not in logger.filters:
        logger.addFilter(_no_tip)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=r"IProgress not found")
    warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
    return name
