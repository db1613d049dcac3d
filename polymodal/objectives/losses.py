"""The next-token losses of a language-modelling stage, over the logits a multimodal LM's
forward gives at label positions (`model.LabelLogits`). The contrastive losses are in
`polymodal.contrastive.losses`.

Two reductions (stage option `loss_average`):
- `token`: the mean over every label token of the batch, as LLaVA trains.
- `sample`: each sample's own mean, then the mean over samples, so that a 14-token answer
  counts as much as a 1-token one and a dataset's weight is its share of the gradient
  whatever the length of its answers (replay's sentences beside one-word answers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(output, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of `output.logits` [N_labels, V] against `output.targets` [N_labels],
    with image codes' (`output.image_logits` [N_image, C]) counted as labels too.

    A fusion's auxiliary loss (`output.aux_loss`, a router's load balancing) is added.

    Args:
        output: a `model.LabelLogits`.
        sample_ids: None for the mean over label tokens; or `Batch.sample_ids` [B, T], which
            sample each token belongs to, for the mean of each sample's mean.
    """
    aux_loss = 0.0 if output.aux_loss is None else output.aux_loss.float()
    per_token = _per_token_losses(output)  # [N_labels (+ N_image)]
    if sample_ids is None:
        return per_token.mean() + aux_loss
    # The label at t+1 is predicted at t: a label's sample is that of the token it predicts.
    owners = sample_ids[:, 1:][output.label_mask]
    if output.image_logits is not None:
        owners = torch.cat([owners, sample_ids[:, 1:][output.image_mask]])
    _, sample = owners.unique(return_inverse=True)  # [N_labels (+ N_image)]
    return per_sample_mean(per_token, sample) + aux_loss


def _per_token_losses(output) -> torch.Tensor:
    """Each label's cross-entropy: text labels over the vocabulary, then (a model that draws)
    image codes over the codebook."""
    per_token = F.cross_entropy(output.logits.float(), output.targets, reduction="none")  # [N_labels]
    if output.image_logits is None:
        return per_token
    codes = F.cross_entropy(output.image_logits.float(), output.image_targets, reduction="none")
    return torch.cat([per_token, codes])


def per_sample_mean(per_token: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """per_token [N] losses, sample [N] in 0..S-1 -> the mean over samples of each one's mean."""
    sums = per_token.new_zeros(int(sample.max()) + 1).index_add(0, sample, per_token)  # [S]
    counts = per_token.new_zeros(sums.shape).index_add(0, sample, torch.ones_like(per_token))
    return (sums / counts).mean()


def summed_next_token_loss(output) -> tuple[float, int]:
    """(the summed cross-entropy over every label token, their number): a held-out loss
    averaged over many batches weights each token alike."""
    per_token = _per_token_losses(output)
    return float(per_token.sum()), int(per_token.numel())
