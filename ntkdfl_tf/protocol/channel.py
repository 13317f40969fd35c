"""The channel between clients: where messages are delivered, lost, replaced, encoded and
counted.

A ``Channel`` is configuration; ``channel.round(num_clients, rng)`` opens one round's
``RoundChannel``, which draws that round's broken links once (so every message over a broken
link j -> i is lost, whatever its kind), replaces what Byzantine senders send (``byzantine``),
encodes what it delivers with the channel's codecs (``codecs``) and sums the bytes of the
encoded payloads. The default channel delivers everything unchanged.
"""

import dataclasses
import typing

import numpy as np

from ntkdfl_tf.protocol import attacks, byzantine as byzantine_lib, codecs
from ntkdfl_tf.protocol.messages import (JacobianPackage, WeightsMessage, flatten,
                                         stack_by_receiver, unflatten)


class Delivery(typing.NamedTuple):
    """What one ``RoundChannel.deliver`` call delivered.

    Attributes:
        messages: the delivered messages, in the order sent (as the receivers decode them).
        unchanged: True when every delivered message is the very object sent (no codec or
            adversary touched it), so a receiver may use the sender's own arrays.
    """

    messages: list
    unchanged: bool


class Adversary(typing.NamedTuple):
    """A round's Byzantine senders as the ``RoundChannel`` applies them.

    Attributes:
        byzantine: the ``byzantine.Byzantine`` threat model.
        clients: ``[K]`` bool, the Byzantine clients.
        rng: the round's ``adversary`` random stream (noise, Gaussian vectors).
        radius: for ``adaptive``: ``radius(own, received, valid) -> [M]``, the receivers'
            defence's acceptance radius (``defences.Defence.radius``); None: no defence.
    """

    byzantine: typing.Any
    clients: np.ndarray
    rng: np.random.Generator
    radius: typing.Any = None


class RoundChannel:
    """One round of a ``Channel``: delivers, replaces, encodes and counts messages.

    Attributes:
        codec, weight_codec: the codecs of Jacobian packages and of weight messages.
        seed: a seed for this round's codec randomness on the receivers' side (stochastic
            rounding of package values), drawn from the channel stream.
        adversary: this round's ``Adversary``, or None.
        bytes_delivered: the encoded bytes delivered so far this round.
    """

    def __init__(self, working, codec=None, weight_codec=None, rng=None, adversary=None):
        self._working = working  # (K, K) boolean [receiver, sender], or None: every link works
        self.codec = codec or codecs.parse("identity")
        self.weight_codec = weight_codec or codecs.parse("identity")
        self._rng = rng if rng is not None else np.random.default_rng(0)
        self.seed = int(self._rng.integers(2**31))
        self.adversary = adversary
        self.bytes_delivered = 0

    @property
    def package_attack(self):
        """The ``byzantine.PackageAttack`` tampered packages carry, or None."""
        return None if self.adversary is None else self.adversary.byzantine.package_attack

    def deliver(self, messages, own=None):
        """Delivers ``messages`` over this round's links; returns a ``Delivery``.

        Args:
            messages: the messages sent.
            own: for an averaging step, the receivers' own weights (list of ``[K, *shape]``
                NumPy arrays), which an omniscient weight attack uses; None for messages no
                weight attack targets (NTK-DFL's requests).
        """
        if self._working is not None:
            messages = [m for m in messages if self._working[m.receiver, m.sender]]
        sent = messages
        if self.adversary is not None:
            messages = self._replace(messages, own)
        messages = self._encode(messages)
        self.bytes_delivered += sum(m.nbytes for m in messages)
        return Delivery(messages, all(a is b for a, b in zip(messages, sent)))

    def _replace(self, messages, own):
        """Byzantine senders' messages replaced by the attack's."""
        adv = self.adversary
        threat = adv.byzantine
        messages = list(messages)
        weights = [i for i, m in enumerate(messages) if isinstance(m, WeightsMessage)]
        if threat.on_weights and own is not None and weights:
            batch = [messages[i] for i in weights]
            attacked = np.unique([m.receiver for m in batch if adv.clients[m.sender]])
            if len(attacked):
                stack = stack_by_receiver(batch, attacked)
                own_flat = np.stack([flatten([w[i] for w in own]) for i in attacked])
                hostile = stack.valid & adv.clients[np.maximum(stack.senders, 0)]
                if threat.attack == "adaptive":
                    radius = (np.full(len(attacked), np.inf) if adv.radius is None else
                              adv.radius(own_flat, stack.received, stack.valid & ~hostile))
                    forged = byzantine_lib.adaptive_weights(
                        own_flat, stack.received, stack.valid, hostile, radius,
                        threat.params["margin"])
                else:
                    forged = attacks.byzantine_weights(threat.attack, threat.params, own_flat,
                                                       stack.received, stack.valid, hostile,
                                                       adv.rng)
                shapes = [w.shape for w in batch[0].weights]
                for r, s in zip(*np.nonzero(hostile)):
                    m = batch[stack.index[r, s]]
                    messages[weights[stack.index[r, s]]] = WeightsMessage(
                        m.sender, m.receiver, unflatten(forged[r, s], shapes))
        if threat.on_packages:
            messages = [dataclasses.replace(m, tampering=threat.package_attack)
                        if isinstance(m, JacobianPackage) and adv.clients[m.sender] else m
                        for m in messages]
        return messages

    def _encode(self, messages):
        weights_lossy = not self.weight_codec.lossless
        encoded, by_sender = [], {}
        for m in messages:
            if isinstance(m, WeightsMessage) and weights_lossy:
                # a sender encodes its weights once and sends the same bytes to everyone
                # (a Byzantine sender's forged messages differ per receiver)
                key = (m.sender, m.receiver) if self._forged(m) else m.sender
                if key not in by_sender:
                    by_sender[key] = tuple(codecs.encode_values(self.weight_codec, w, self._rng)
                                           for w in m.weights)
                m = WeightsMessage(m.sender, m.receiver, by_sender[key], self.weight_codec,
                                   m.mask)
            elif isinstance(m, JacobianPackage) and self.codec.stages:
                m = dataclasses.replace(m, codec=self.codec, samples=self._subsample(m))
            encoded.append(m)
        return encoded

    def _forged(self, message):
        return self.adversary is not None and bool(self.adversary.clients[message.sender])

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
        byzantine: a ``byzantine.Byzantine`` threat model, or None (every sender honest).

    Raises:
        ValueError: a probability outside [0, 1), or a bad codec string (``codecs.CodecError``).
    """

    def __init__(self, message_loss=0.0, codec="identity", weight_codec="identity",
                 byzantine=None):
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
        if byzantine is not None and not isinstance(byzantine, byzantine_lib.Byzantine):
            raise TypeError(f"byzantine must be an ntkdfl_tf.protocol.Byzantine or None, got "
                            f"{byzantine!r}.")
        self.byzantine = byzantine

    @property
    def config(self):
        """The channel's settings (for checkpoint fingerprints and logs)."""
        config = {"message_loss": self.message_loss, "codec": self.codec.spec,
                  "weight_codec": self.weight_codec.spec}
        if self.byzantine is not None:  # absent otherwise: earlier checkpoints stay valid
            config["byzantine"] = self.byzantine.config
        return config

    def round(self, num_clients, rng, adversary=None):
        """Opens a round: draws which links fail (no draw without loss) and the codecs' seed.

        ``adversary``: the round's ``Adversary`` (the trainer builds it from ``byzantine``).
        """
        working = None
        if self.message_loss:
            working = rng.random((num_clients, num_clients)) >= self.message_loss
        return RoundChannel(working, self.codec, self.weight_codec, rng, adversary)

    def __repr__(self):
        return (f"Channel(message_loss={self.message_loss}, codec={self.codec.spec!r}, "
                f"weight_codec={self.weight_codec.spec!r}, byzantine={self.byzantine!r})")
