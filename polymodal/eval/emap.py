"""EMAP, the empirical multimodally-additive function projection (Hessel & Lee, EMNLP 2020).

Score every (question i, image j) pair of a sample for every candidate answer c:
scores [N, N, C]. The best approximation of the model by f(question) + g(image), per
answer, is

    projection[i, j, c] = mean_j' scores[i, j', c] + mean_i' scores[i', j, c] - mean scores[:, :, c]

If the projection's accuracy on the true pairs (i, i) is close to the model's, the model
gains nothing from cross-modal interactions: it reads the question and the image
separately and adds up what each says.
"""

from __future__ import annotations

import torch


def emap_projection(scores: torch.Tensor) -> torch.Tensor:
    """scores [N_questions, N_images, C] -> the additive projection, same shape."""
    return scores.mean(1, keepdim=True) + scores.mean(0, keepdim=True) - scores.mean((0, 1), keepdim=True)


def diagonal_choices(scores: torch.Tensor) -> list[int]:
    """The chosen answer for each true pair (i, i): argmax over C of scores[i, i]."""
    return scores.diagonal(dim1=0, dim2=1).argmax(0).tolist()  # diagonal -> [C, N]
