"""Other libraries' import-time log lines about their own optional back-ends, kept off the console.

Importing PEFT imports torchao where it is installed (axolotl and torchtune pull it in, and the
README's install has it), and torchao logs that its CUDA kernels do not load on this machine and,
through torch, that it registers enums the old way: five lines of another library's set-up under
every LoRA fit, none of which a user can act on. They are raised to errors only while the import
runs; what those libraries log later is untouched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# the loggers that speak while PEFT imports torchao (children such as torchao.kernel inherit)
NOISY = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_backends() -> Iterator[None]:
    """Hold :data:`NOISY`'s loggers at ERROR for the block (an import), then restore their levels."""
    loggers = [logging.getLogger(name) for name in NOISY]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
