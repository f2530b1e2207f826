"""Composer's language metrics fed from (summed loss, token count) instead of logits.

Composer's LanguageCrossEntropy / LanguagePerplexity keep (sum_loss, total_items) and compute them from
the (B, T, V) logits in update(). The causal objective (data/causal_lm.py) already has the batch's
summed loss from the fused head + cross-entropy, so these take that sum and count directly: same
states, same compute(), the logits never held whole.
"""

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity


class _FromSums:
    def update(self, output, target=None) -> None:
        self.sum_loss += output.sum_loss
        self.total_items += output.n_tokens


class CrossEntropyFromSums(_FromSums, LanguageCrossEntropy):
    pass


class PerplexityFromSums(_FromSums, LanguagePerplexity):
    pass
