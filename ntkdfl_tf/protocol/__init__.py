"""What clients send each other, and the channel that delivers it.

Messages are typed objects whose ``nbytes`` is measured from the arrays they carry
(``messages``). Every message of a round passes through one ``Channel`` (``channel``): the one
place where messages are lost, replaced by Byzantine senders (``byzantine``) and encoded. A round's ``bytes_sent``
is the sum of what the channel delivered.
"""

from ntkdfl_tf.protocol import attacks, byzantine, codecs
from ntkdfl_tf.protocol.byzantine import Byzantine
from ntkdfl_tf.protocol.channel import Adversary, Channel, Delivery, RoundChannel
from ntkdfl_tf.protocol.codecs import CodecError
from ntkdfl_tf.protocol.messages import (ArraySpec, JacobianPackage, ReceivedStack,
                                         WeightsMessage, heard_from, package_specs,
                                         stack_by_receiver, weights_messages)

__all__ = ["Adversary", "ArraySpec", "Byzantine", "Channel", "CodecError", "Delivery",
           "JacobianPackage", "ReceivedStack", "RoundChannel", "WeightsMessage", "attacks",
           "byzantine", "codecs", "heard_from", "package_specs", "stack_by_receiver",
           "weights_messages"]
