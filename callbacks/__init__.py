"""Lightning callbacks for paretomerge: the learned front in TensorBoard, the MAP baseline, the end-of-fit summary,
and progress as lines for a log.

The repository keeps them in the top-level ``callbacks/`` folder; they install as ``paretomerge.callbacks``
(setup.cfg's ``package_dir``), so site-packages gets no generic ``callbacks``. They import the library, never the
reverse. Configs name them ``paretomerge.callbacks.ParetoFrontLogger``, ``...MAPBaseline``, ``...FitSummary``.
"""

from paretomerge.callbacks.fit_summary import FitSummary
from paretomerge.callbacks.front_logger import ParetoFrontLogger
from paretomerge.callbacks.map_baseline import MAPBaseline
from paretomerge.callbacks.progress_bar import LogProgressBar

__all__ = ["FitSummary", "LogProgressBar", "MAPBaseline", "ParetoFrontLogger"]
