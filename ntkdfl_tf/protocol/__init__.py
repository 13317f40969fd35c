"""What clients send each other, and the channel that delivers it.

Messages are typed objects whose ``nbytes`` is measured from the arrays they carry
(``messages``). Every message of a round passes through one ``Channel`` (``channel``): the one
place where messages are lost and, in later work, encoded or replaced. A round's ``bytes_sent``
is the sum of what the channel delivered.
"""

from ntkdfl_tf.protocol import codecs
from ntkdfl_tf.protocol.channel import Channel, Delivery, RoundChannel
from ntkdfl_tf.protocol.codecs import CodecError
from ntkdfl_tf.protocol.messages import (ArraySpec, JacobianPackage, WeightsMessage, heard_from,
                                         package_specs, weights_messages)

__all__ = ["ArraySpec", "Channel", "CodecError", "Delivery", "JacobianPackage", "RoundChannel", "codecs",
           "WeightsMessage", "heard_from", "package_specs", "weights_messages"]
