"""Third-party log notices known to be harmless here, filtered by their exact text (anything
else still shows): ``Without(text)``, a filter for one logger, and ``quiet(notices)``, the same
for a block."""

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator, Tuple


class Without(logging.Filter):
    """Drops the records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def quiet(notices: Iterable[Tuple[str, str]]) -> Iterator[None]:
    """Within the block, drop each ``(logger name, text)`` notice (``""``: the root logger)."""
    filters = [(logging.getLogger(name), Without(text)) for name, text in notices]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
