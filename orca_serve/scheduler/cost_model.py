"""Online model of iteration time, for SLO-aware token budgets and admission.

An iteration's time is close to affine in the number of tokens it computes
(fixed launch and per-layer overheads plus matmuls that scale with tokens).
We fit t = a + b * tokens by exponentially weighted least squares, so the
model follows the machine's current speed.
"""
from __future__ import annotations


class IterationCostModel:
    def __init__(self, decay: float = 0.95, prior_a: float = 0.01, prior_b: float = 1e-4) -> None:
        self.decay = decay
        self.a, self.b = prior_a, prior_b
        # Weighted sums for least squares: n, sum x, sum y, sum xx, sum xy.
        self._s = [0.0, 0.0, 0.0, 0.0, 0.0]
        self.num_observations = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        d = self.decay
        x, y = float(num_tokens), float(seconds)
        s = self._s
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            s[i] = s[i] * d + v
        self.num_observations += 1
        n, sx, sy, sxx, sxy = s
        det = n * sxx - sx * sx
        if det > 1e-9 * max(1.0, n * sxx):
            b = (n * sxy - sx * sy) / det
            a = (sy - b * sx) / n
            if b > 0 and a >= 0:
                self.a, self.b = a, b
                return
        # Too little spread in token counts to separate a and b: keep a, fit b.
        self.b = max((sy / n - self.a) / max(sx / n, 1.0), 1e-9)

    def predict(self, num_tokens: int) -> float:
        return self.a + self.b * max(num_tokens, 0)

    def max_tokens_within(self, seconds: float) -> int:
        """Most tokens one iteration can compute and still take <= seconds."""
        return max(int((seconds - self.a) / self.b), 0)
