"""The channel between clients: where messages are delivered, lost and counted.

A ``Channel`` is configuration; ``channel.round(num_clients, rng)`` opens one round's
``RoundChannel``, which draws that round's broken links once (so every message over a broken
link j -> i is lost, whatever its kind) and sums the bytes it delivers. The default channel
delivers everything unchanged.
"""

import typing

import numpy as np


class Delivery(typing.NamedTuple):
    """What one ``RoundChannel.deliver`` call delivered.

    Attributes:
        messages: the delivered messages, in the order sent.
        unchanged: True when every delivered message is the very object sent (no codec or
            adversary touched it), so a receiver may use the sender's own arrays.
    """

    messages: list
    unchanged: bool


class RoundChannel:
    """One round of a ``Channel``: delivers messages and counts the bytes delivered."""

    def __init__(self, working):
        self._working = working  # (K, K) boolean [receiver, sender], or None: every link works
        self.bytes_delivered = 0

    def deliver(self, messages):
        """Delivers ``messages`` over this round's links; returns a ``Delivery``."""
        if self._working is not None:
            messages = [m for m in messages if self._working[m.receiver, m.sender]]
        self.bytes_delivered += sum(m.nbytes for m in messages)
        return Delivery(list(messages), True)


class Channel:
    """Delivery between clients, the one place where messages are lost.

    Args:
        message_loss: probability that the directed link j -> i fails in a round; every message
            j sends i that round is lost. Drawn from the run's ``channel`` random stream.
    """

    def __init__(self, message_loss=0.0):
        if not isinstance(message_loss, (int, float, np.floating)) or not 0.0 <= message_loss < 1:
            raise ValueError(f"message_loss must be a probability in [0, 1), got "
                             f"{message_loss!r}.")
        self.message_loss = float(message_loss)

    @property
    def config(self):
        """The channel's settings (for checkpoint fingerprints and logs)."""
        return {"message_loss": self.message_loss}

    def round(self, num_clients, rng):
        """Opens a round: draws which links fail (nothing is drawn without loss)."""
        working = None
        if self.message_loss:
            working = rng.random((num_clients, num_clients)) >= self.message_loss
        return RoundChannel(working)

    def __repr__(self):
        return f"Channel(message_loss={self.message_loss})"
