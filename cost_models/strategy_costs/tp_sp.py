"""`tp_sp`: Megatron tensor parallelism with sequence parallelism (Korthikanti et al. 2022)."""

from __future__ import annotations

from .base import StrategyCost


class TensorSequenceParallelCost(StrategyCost):
    """Weights stay as shards; the (T/P, H) inputs of the column-sharded projections are
    all-gathered, the partial outputs of the row-sharded ones reduce-scattered. Attention runs
    heads/P heads over whole sequences, gathered tokens reordered to natural order and back.

    Its communication is the formula of `parallel_lib.strategies.tp_sp.TensorSequenceParallel`'s
    docstring, computed here.
    """

    name = "tp_sp"
    mlp_mode = "tensor_parallel"
    has_token_gather = True

    def factorisation(self, P, inner=None):
        return P, 1

    def matmul(self, m, i, o, column):
        return ((m.T, i, o // m.P) if column else (m.T, i // m.P, o)), 1

    def attention_layout(self, m):
        return m.Q // m.d // m.P, 1, 1

    # ------------------------------------------------------------------ collectives
    @staticmethod
    def _volume(m) -> int:
        return (m.P - 1) * m.tl * m.H * m.e

    def forward_traffic(self, t, m):
        t.add("all_gather", 2 * self._volume(m), 2)
        t.add("reduce_scatter", 2 * self._volume(m), 2)

    def backward_traffic(self, t, m):
        t.add("all_gather", 2 * self._volume(m), 2)  # the row-sharded outputs' gradients
        if m.trainable:
            self.weight_grad_traffic(t, m)
        t.add("reduce_scatter", 2 * self._volume(m), 2)  # the column-sharded inputs' gradients

    def weight_grad_traffic(self, t, m):
        t.add("all_gather", 2 * self._volume(m), 2)  # the column-sharded inputs, gathered again

    def recompute_traffic(self, t, m, recompute):
        if not m.trainable and recompute != "none":  # no weight gradient takes over its gathers
            gathers = 2 if recompute == "full" else 1
            t.add("all_gather", gathers * self._volume(m), gathers)
        if recompute == "full":  # the attention output's reduce-scatter runs again
            t.add("reduce_scatter", self._volume(m), 1)

    # ------------------------------------------------------------------ replay
    def sorts(self, m):
        return m.P > 1

    def linear_output(self, m, column, o):
        return (m.T * o // m.P if column else m.tl * o) * m.e

    def replay_linear_forward(self, tape, m, column, i, o, keep):
        e = m.e
        if column:
            gathered = tape.alloc(m.T * i * e)
            out = tape.alloc(m.T * o // m.P * e)
            if not (keep and m.trainable):  # only the weight gradient reads it again
                tape.free(gathered)
        else:
            partial = tape.alloc(m.T * o * e)
            out = tape.alloc(m.tl * o * e)
            tape.temp(partial if m.rs_copy else 0)
            tape.free(partial)
        return out

    def replay_linear_backward(self, tape, m, column, i, o, kept):
        e = m.e
        if column:  # a frozen weight gathers no input again and makes no weight gradient
            gathered = 0 if kept or not m.trainable else tape.alloc(m.T * i * e)
            weight_grad = tape.alloc(i * o // m.P * m.w) if m.trainable else 0
            partial = tape.alloc(m.T * i * e)
            tape.alloc(m.tl * i * e)
            tape.temp(partial if m.rs_copy else 0)
            tape.free(partial, gathered, weight_grad)
        else:
            gathered_grad = tape.alloc(m.T * o * e)
            weight_grad = tape.alloc(i // m.P * o * m.w) if m.trainable else 0
            tape.alloc(m.T * i // m.P * e)
            tape.free(gathered_grad, weight_grad)

    def output_grad_before_recompute(self, m, o):
        # the reduce-scatter's backward all-gathers it before anything saved is read. Counted for
        # frozen layers only: a trainable layer's peak comes later, with its weight gradients
        # (counting it there overstates the peak: docs/cost_models.md)
        return m.T * o * m.e if not m.trainable else 0

    def kept_operand(self, m, column, i, o):
        return m.T * i * m.e if column and m.trainable else 0

    def replay_last_recomputed(self, tape, m, i, o):
        if m.trainable:  # the partial product, computed before its operands are saved
            tape.temp(m.T * o * m.e)
        # frozen: the recomputation stops at the SwiGLU, the last op that saves a tensor
