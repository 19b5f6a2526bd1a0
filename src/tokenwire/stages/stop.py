"""Stop sequences as a stage's helper: ``StopMatcher`` lives in ``tokenwire.stops``.

It sits at the bottom layer because the embedded backend runs it inside its decode loop;
this module keeps the name where stages look for it.
"""

from __future__ import annotations

from tokenwire.stops import StopMatcher

__all__ = ["StopMatcher"]
