"""`local`: the plain single-rank layer (P = 1): whole weights, whole sequences, no collectives."""

from __future__ import annotations

from .base import StrategyCost


class LocalCost(StrategyCost):
    """Every matmul and attention call over all T tokens and all heads; nothing is sent."""

    name = "local"
    mlp_mode = "local"

    def factorisation(self, P, inner=None):
        return P, 1

    def check(self, shape, P, inner=None):
        if P != 1:
            raise ValueError(f"local runs on one rank only, got P={P}")
        super().check(shape, P, inner)

    def matmul(self, m, i, o, column):
        return (m.T, i, o), 1

    def attention_layout(self, m):
        return m.Q // m.d, 1, 1

    def replay_linear_forward(self, tape, m, column, i, o, keep):
        return tape.alloc(m.T * o * m.e)

    def replay_linear_backward(self, tape, m, column, i, o, kept):
        tape.temp(i * o * m.w if m.trainable else 0)  # the weight gradient
        tape.alloc(m.T * i * m.e)
