"""Text out of token ids: incremental detokenization and stop strings. No tensors.

:class:`IncrementalDetokenizer` turns each step's new token ids into a text
delta that never splits a character; :class:`StopStringMatcher` then cuts the
deltas at the first stop string, holding back text that may still become one.
"""

from streamgen.text.detokenizer import IncrementalDetokenizer
from streamgen.text.stop import StopStringMatcher

__all__ = ["IncrementalDetokenizer", "StopStringMatcher"]
