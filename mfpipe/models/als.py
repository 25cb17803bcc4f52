"""implicit's Alternating Least Squares (Hu, Koren & Volinsky 2008) on confidence-weighted interactions.

implicit reads the values of the user x item CSR as the confidence C_ui itself (preference 1 where
stored, confidence 1 and preference 0 elsewhere), so we build `1 + alpha * r` here rather than rely on
its `alpha` (which scales the values without the 1 +). `binary=True` (or data without ratings) uses r = 1.

Tuned defaults: ~70 random/grid trials on ml-latest-small, random-per-user 75/25 (NDCG@10 averaged over
two split seeds). Binary confidences with a strong ridge (regularization ~5-7x the confidence 1 + alpha)
won clearly: NDCG@10 0.38 against 0.31 for factors 64 / regularization 0.05 / alpha 2 / graded
ratings, and the same choice held on the synthetic default data (0.32 vs 0.21 random-per-user, 0.17 vs
0.13 temporal; generator as of the tuning). 128 factors scored the same on MovieLens, worse on synthetic: 64.
Re-checked with Optuna (benchmarks/TUNING.md): 40 TPE trials on inner splits of ml-latest-small's train
parts chose 26-38 factors and graded confidences, +0.006-0.010 on the inner split but -0.02 on the outer
validation (the smaller inner train favours less capacity), so the defaults stay.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from mfpipe.data.interactions import Interactions
from mfpipe.models.base import FactorModel, ModelParams


class ALSParams(ModelParams):
    """Defaults tuned on ml-latest-small, random-per-user (see the module docstring)."""

    factors: int = Field(64, ge=1)
    regularization: float = Field(20.0, ge=0)
    alpha: float = Field(1.0, ge=0)
    iterations: int = Field(10, ge=1)
    binary: bool = True


class ALS(FactorModel):
    """User/item factors (float32) exported from implicit; no item bias (zeros)."""

    name: ClassVar[str] = "als"
    Params: ClassVar[type[ModelParams]] = ALSParams
    params: ALSParams

    def confidence(self, train: Interactions) -> Any:
        """User x item CSR (implicit >= 0.7 convention) of confidences 1 + alpha * r, float32."""
        matrix = train.matrix.copy()
        if self.params.binary or train.ratings is None:
            matrix.data[:] = 1.0
        matrix.data = (1.0 + self.params.alpha * matrix.data).astype(np.float32)
        return matrix

    def implicit_model(self) -> Any:
        """The configured implicit model (CPU, float32, seeded); also what the fit benchmark times."""
        from implicit.cpu.als import AlternatingLeastSquares

        return AlternatingLeastSquares(
            factors=self.params.factors,
            regularization=self.params.regularization,
            alpha=1.0,
            iterations=self.params.iterations,
            dtype=np.float32,
            num_threads=self.threads or 0,
            random_state=self.seed,
        )

    def _fit(self, train: Interactions) -> None:
        """implicit 0.7.3 calls `callback` after every iteration and passes `num_threads` to each solver call:
        raising from the callback stops the fit, and setting `num_threads` there applies to the next iteration."""
        model = self.implicit_model()
        total = self.params.iterations

        def between_iterations(iteration: int, _seconds: float, _loss: float | None) -> None:
            if iteration + 1 < total:
                self.check_deadline(f"after iteration {iteration + 1} of {total}")
                model.num_threads = self.threads or 0

        model.fit(self.confidence(train), show_progress=False, callback=between_iterations)
        self.user_factors = np.ascontiguousarray(model.user_factors, np.float32)
        self.item_factors = np.ascontiguousarray(model.item_factors, np.float32)
        self.item_bias = np.zeros(train.n_items, np.float32)
