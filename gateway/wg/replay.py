"""Sliding anti-replay window for transport counters (RFC 6479 style bitmap of words).

The bitmap is a ring of ``REPLAY_WORDS`` 64-bit words. Moving forward clears only the
words that slide out, so a packet costs a handful of integer operations; a jump further
than the ring clears it all. A counter is accepted when it is below the reject limit,
not yet seen, and either newer than the greatest seen or less than ``REPLAY_WINDOW``
behind it.

Call :meth:`accept` only after the packet authenticated: marking forged counters would
let an attacker shift the window.
"""

from __future__ import annotations

from gateway.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW, REPLAY_WORDS

_WORD_MASK = REPLAY_WORDS - 1
assert REPLAY_WORDS & _WORD_MASK == 0, "ring size must be a power of two"


class ReplayWindow:
    """Which receive counters were seen; see the module docstring."""

    __slots__ = ("_greatest", "_words")

    def __init__(self) -> None:
        self._greatest = -1
        self._words = [0] * REPLAY_WORDS

    @property
    def greatest(self) -> int:
        """The largest counter accepted so far (-1 before the first)."""
        return self._greatest

    def accept(self, counter: int) -> bool:
        """Mark ``counter`` as seen; False when it is a replay, too old, or out of range."""
        greatest = self._greatest
        if counter > greatest:
            if counter >= REJECT_AFTER_MESSAGES:
                return False
            block = counter >> 6
            current = greatest >> 6 if greatest >= 0 else -1
            advance = block - current
            words = self._words
            if advance:
                if advance >= REPLAY_WORDS:
                    for i in range(REPLAY_WORDS):
                        words[i] = 0
                else:
                    for b in range(current + 1, block + 1):
                        words[b & _WORD_MASK] = 0
            self._greatest = counter
            words[block & _WORD_MASK] |= 1 << (counter & 63)
            return True
        if greatest - counter >= REPLAY_WINDOW or counter < 0:
            return False
        words = self._words
        index = (counter >> 6) & _WORD_MASK
        bit = 1 << (counter & 63)
        word = words[index]
        if word & bit:
            return False
        words[index] = word | bit
        return True
