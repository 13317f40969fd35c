"""Client failures, drawn from their own seeded stream.

``Faults`` says who takes part in each round: a dropped-out client neither sends nor updates
that round (its neighbours average and build kernels without it), and a client that left is
gone for good (and out of the aggregate). Lost messages are the channel's
(``ntkdfl_tf.protocol.Channel(message_loss=...)``).
"""

import numpy as np


class Faults:
    """Fault injection for ``DecentralizedTrainer(faults=...)``.

    Args:
        dropout: probability that a client sits out a round, independently per client and round.
        leave: ``{client: round}``: the client leaves permanently before that (0-based) round.
    """

    def __init__(self, dropout=0.0, leave=None):
        if not isinstance(dropout, (int, float, np.floating)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}.")
        leave = dict(leave or {})
        for client, r in leave.items():
            if not isinstance(client, (int, np.integer)) or client < 0 or \
                    not isinstance(r, (int, np.integer)) or r < 0:
                raise ValueError(f"leave maps client index -> round (non-negative integers), "
                                 f"got {client!r}: {r!r}.")
        self.dropout, self.leave = float(dropout), leave

    @property
    def config(self):
        """The settings (for checkpoint fingerprints)."""
        return {"dropout": self.dropout, "leave": {str(c): r for c, r in sorted(self.leave.items())}}

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

    def participants(self, num_clients, round_index, rng):
        """Boolean [K]: clients that take part in (send and update in) this round."""
        return self.present(num_clients, round_index) & (rng.random(num_clients) >= self.dropout)

    def __repr__(self):
        return f"Faults(dropout={self.dropout}, leave={self.leave})"
