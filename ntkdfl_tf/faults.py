"""Client failures and lost messages, drawn from their own seeded stream.

``Faults`` turns each round's graph into the graph that actually worked: a dropped-out client
neither sends nor updates that round (its neighbours average and build kernels without it), a
client that left is gone for good (and out of the aggregate), and each directed message is
lost with some probability (the receiver proceeds without the sender's weights and Jacobians).
"""

import numpy as np


class Faults:
    """Fault injection for ``DecentralizedTrainer(faults=...)``.

    Args:
        dropout: probability that a client sits out a round, independently per client and round.
        message_loss: probability that a directed message j -> i is lost in a round.
        leave: ``{client: round}``: the client leaves permanently before that (0-based) round.
    """

    def __init__(self, dropout=0.0, message_loss=0.0, leave=None):
        for name, p in (("dropout", dropout), ("message_loss", message_loss)):
            if not isinstance(p, (int, float, np.floating)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}.")
        leave = dict(leave or {})
        for client, r in leave.items():
            if not isinstance(client, (int, np.integer)) or client < 0 or \
                    not isinstance(r, (int, np.integer)) or r < 0:
                raise ValueError(f"leave maps client index -> round (non-negative integers), "
                                 f"got {client!r}: {r!r}.")
        self.dropout, self.message_loss, self.leave = float(dropout), float(message_loss), leave

    @classmethod
    def parse_leave(cls, text):
        """``"3:5,7:10"`` (client:round pairs, the launcher flag's form) -> ``{3: 5, 7: 10}``."""
        leave = {}
        for item in filter(None, (s.strip() for s in (text or "").split(","))):
            try:
                client, r = (int(v) for v in item.split(":"))
            except ValueError:
                raise ValueError(f"--leave takes client:round pairs such as 3:5,7:10; got "
                                 f"{item!r}.") from None
            leave[client] = r
        return leave

    def validate(self, num_clients):
        bad = [c for c in self.leave if c >= num_clients]
        if bad:
            raise ValueError(f"leave names client(s) {bad} but there are only {num_clients} "
                             f"clients (indices 0..{num_clients - 1}).")
        if len(self.leave) >= num_clients:
            raise ValueError("leave removes every client; keep at least one.")

    def present(self, num_clients, round_index):
        """Boolean [K]: clients that have not left before ``round_index``."""
        present = np.ones(num_clients, bool)
        for client, r in self.leave.items():
            if round_index >= r:
                present[client] = False
        return present

    def apply(self, adjacency, round_index, rng):
        """The round's working graph and who takes part.

        Returns:
            ``(active, adjacency)``: boolean [K] of clients that update this round, and the
            adjacency with every edge of an inactive client and every lost message removed
            (row i = whom client i hears from, so it may be asymmetric).
        """
        k = len(adjacency)
        active = self.present(k, round_index) & (rng.random(k) >= self.dropout)
        kept = adjacency & active[:, None] & active[None, :]
        if self.message_loss:
            kept &= rng.random((k, k)) >= self.message_loss
        return active, kept

    def __repr__(self):
        return (f"Faults(dropout={self.dropout}, message_loss={self.message_loss}, "
                f"leave={self.leave})")
