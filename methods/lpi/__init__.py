"""LPI — Low-rank Prompt Interaction for continual vision-language retrieval (ACM MM 2024).

Documentation, with what the reference code (Kelvin-ywc/LPI) does and where each choice comes
from: ``docs/methods/lpi.md``. Two presets share one implementation: ``lpi_released`` (the
reference retrieval code's behaviour) and ``lpi`` (the harness's recommendation: the pieces the
retrieval code lacks taken from the authors' grounding code, plus a corrected task loss).

Components, each a small unit:

* :mod:`.prompts` — the per-task CP-decomposed multi-modal prompt and its placement (§3.1, §2.1);
* :mod:`.interaction` — our retrieval adaptation of grounding's correlation module, and its block hooks (§3.2);
* :mod:`.losses` — layer-level alignment and the task contrastive constraint (§4.2, §4.3);
* :mod:`.similarity` — the task-similarity matrix: shipped CSV or the backbone's text encoder;
* :mod:`.method` — the :class:`~benchmark.Method` subclasses, routing and optimiser (§3.4, §5.1).
"""

from .method import LPI, LPIConfig, LPIReleased, LPIReleasedConfig

__all__ = ["LPI", "LPIConfig", "LPIReleased", "LPIReleasedConfig"]
