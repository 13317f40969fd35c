"""The channel between clients: where messages are delivered, lost, encoded and counted.

A ``Channel`` is configuration; ``channel.round(num_clients, rng)`` opens one round's
``RoundChannel``, which draws that round's broken links once (so every message over a broken
link j -> i is lost, whatever its kind), encodes what it delivers with the channel's codecs
(``codecs``) and sums the bytes of the encoded payloads. The default channel delivers
everything unchanged.
"""

import dataclasses
import typing

import numpy as np

from ntkdfl_tf.protocol import codecs
from ntkdfl_tf.protocol.messages import JacobianPackage, WeightsMessage


class Delivery(typing.NamedTuple):
    """What one ``RoundChannel.deliver`` call delivered.

    Attributes:
        messages: the delivered messages, in the order sent (as the receivers decode them).
        unchanged: True when every delivered message is the very object sent (no codec or
            adversary touched it), so a receiver may use the sender's own arrays.
    """

    messages: list
    unchanged: bool


class RoundChannel:
    """One round of a ``Channel``: delivers, encodes and counts messages.

    Attributes:
        codec, weight_codec: the codecs of Jacobian packages and of weight messages.
        seed: a seed for this round's codec randomness on the receivers' side (stochastic
            rounding of package values), drawn from the channel stream.
        bytes_delivered: the encoded bytes delivered so far this round.
    """

    def __init__(self, working, codec=None, weight_codec=None, rng=None):
        self._working = working  # (K, K) boolean [receiver, sender], or None: every link works
        self.codec = codec or codecs.parse("identity")
        self.weight_codec = weight_codec or codecs.parse("identity")
        self._rng = rng if rng is not None else np.random.default_rng(0)
        self.seed = int(self._rng.integers(2**31))
        self.bytes_delivered = 0

    def deliver(self, messages):
        """Delivers ``messages`` over this round's links; returns a ``Delivery``."""
        if self._working is not None:
            messages = [m for m in messages if self._working[m.receiver, m.sender]]
        sent = messages
        messages = self._encode(messages)
        self.bytes_delivered += sum(m.nbytes for m in messages)
        return Delivery(messages, all(a is b for a, b in zip(messages, sent)))

    def _encode(self, messages):
        weights_lossy = not self.weight_codec.lossless
        encoded, by_sender = [], {}
        for m in messages:
            if isinstance(m, WeightsMessage) and weights_lossy:
                # a sender encodes its weights once and sends the same bytes to everyone
                if m.sender not in by_sender:
                    by_sender[m.sender] = tuple(codecs.encode_values(self.weight_codec, w,
                                                                     self._rng)
                                                for w in m.weights)
                m = WeightsMessage(m.sender, m.receiver, by_sender[m.sender], self.weight_codec)
            elif isinstance(m, JacobianPackage) and self.codec.stages:
                m = dataclasses.replace(m, codec=self.codec, samples=self._subsample(m))
            encoded.append(m)
        return encoded

    def _subsample(self, package):
        """The samples a package keeps under ``subsample`` (None: all)."""
        n = package.num_samples
        kept = self.codec.kept_samples(n)
        if kept == n:
            return None
        return np.sort(self._rng.choice(n, kept, replace=False))


class Channel:
    """Delivery between clients: lost links and codecs, in this one place.

    Args:
        message_loss: probability that the directed link j -> i fails in a round; every message
            j sends i that round is lost. Drawn from the run's ``channel`` random stream.
        codec: how Jacobian packages are encoded (``codecs`` string, ``identity`` by default).
        weight_codec: how weight messages are encoded (``identity``, ``quantize:bits=8``, ...).

    Raises:
        ValueError: a probability outside [0, 1), or a bad codec string (``codecs.CodecError``).
    """

    def __init__(self, message_loss=0.0, codec="identity", weight_codec="identity"):
        if not isinstance(message_loss, (int, float, np.floating)) or not 0.0 <= message_loss < 1:
            raise ValueError(f"message_loss must be a probability in [0, 1), got "
                             f"{message_loss!r}.")
        self.message_loss = float(message_loss)
        self.codec = codecs.parse(codec)
        self.weight_codec = codecs.parse(weight_codec)
        wrong = [s.name for s in self.weight_codec.stages if s.name not in ("topk", "quantize")]
        if wrong:
            raise codecs.CodecError(f"weight_codec {self.weight_codec.spec!r}: {wrong[0]} acts "
                                    "on Jacobian packages only; weights take topk and quantize.")

    @property
    def config(self):
        """The channel's settings (for checkpoint fingerprints and logs)."""
        return {"message_loss": self.message_loss, "codec": self.codec.spec,
                "weight_codec": self.weight_codec.spec}

    def round(self, num_clients, rng):
        """Opens a round: draws which links fail (no draw without loss) and the codecs' seed."""
        working = None
        if self.message_loss:
            working = rng.random((num_clients, num_clients)) >= self.message_loss
        return RoundChannel(working, self.codec, self.weight_codec, rng)

    def __repr__(self):
        return (f"Channel(message_loss={self.message_loss}, codec={self.codec.spec!r}, "
                f"weight_codec={self.weight_codec.spec!r})")
