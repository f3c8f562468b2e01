"""The error of the data package and the integer check its settings share."""

from __future__ import annotations

import numpy as np


class DataError(ValueError):
    """A data setting or file the user can fix; the message says what to change, in one line."""


def check_int(what: str, value: int, least: int) -> None:
    """Refuse `value` (the setting `what`) unless it is an integer >= `least`, bools excluded."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise DataError(f"{what} is {value!r}: set it to an integer >= {least}")
