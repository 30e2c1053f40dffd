"""The one error type the data pipeline raises for bad input."""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """Bad dataset input: a missing or unreadable file, a malformed annotation, an unknown class,
    an inverted box, a reference to an unknown image or category.

    The message always starts with the offending file's path and then names the problem (the field,
    the object index, the value), e.g. ``"/data/ann/img1.xml: object 2: missing field
    'bndbox/xmin'"``. Subclasses ``ValueError`` so callers that catch that keep working.
    """
