"""Scoring for validation, eval and predict: ranking by logit margin, non-finite logits."""
import math

import pytest
import torch
import torch.nn as nn

from sficonv_ext.train.data import Sample
from sficonv_ext.train.distributed import Context
from sficonv_ext.train.errors import NonFiniteScoreError
from sficonv_ext.train.evaluation import ScoringSet, metrics_of
from sficonv_ext.train.images import Batch
from sficonv_ext.train.loop import score
from sficonv_ext.train.metrics import mean_probability_log_odds
from sficonv_ext.train.transforms import EvalTransform
from test_train_support import write_image



class LogitsInPixels(nn.Module):
    """Returns the logits an image carries in its first two channels at pixel (0, 0)."""

    def forward(self, x):
        return x[:, :2, 0, 0].clone()


def _batch(logits, labels, first_index):
    images = torch.zeros(len(logits), 3, 4, 4)
    images[:, :2, 0, 0] = torch.tensor(logits)
    return Batch(images, torch.tensor(labels), torch.arange(first_index, first_index + len(labels)),
                 [])


def test_confident_scores_are_ranked_by_margin_not_by_a_saturated_probability():
    # Margins 40-50 for the fakes and 38 for one real: every softmax probability rounds to
    # exactly 1.0 even in float64, which would tie the real with the fakes (AUC 0.75).
    loader = [_batch([[0.0, 40.0], [0.0, 45.0]], [1, 1], 0),
              _batch([[0.0, 50.0], [0.0, 38.0], [5.0, 0.0]], [1, 0, 0], 2)]
    scored = score(LogitsInPixels(), loader, Context())
    assert scored["margins"] == [40.0, 45.0, 50.0, 38.0, -5.0]
    assert scored["scores"][:4] == [1.0] * 4  # what the probability can say
    assert math.isclose(scored["scores"][4], 1 / (1 + math.exp(5.0)), rel_tol=1e-12)
    assert scored["predictions"] == [1, 1, 1, 1, 0]
    samples = [Sample(f"{i}.png", y) for i, y in enumerate(scored["labels"])]
    metrics = metrics_of(scored, samples)
    assert metrics["auc"] == 1.0 and metrics["eer"] == 0.0
    assert metrics["acc"] == 0.8


def test_probabilities_are_the_softmax_of_the_fake_class():
    logits = torch.randn(6, 2, dtype=torch.float64) * 4
    loader = [_batch(logits.tolist(), [0, 1, 0, 1, 0, 1], 0)]
    scored = score(LogitsInPixels(), loader, Context())
    expected = torch.softmax(logits.float().double(), dim=1)[:, 1]
    assert torch.allclose(torch.tensor(scored["scores"], dtype=torch.float64), expected,
                          rtol=1e-12, atol=0)


class NanForWideImages(nn.Module):
    def forward(self, x):
        margin = float("nan") if x.shape[-1] == 40 else 1.0
        return torch.tensor([[0.0, margin]]).expand(x.shape[0], 2)


def test_non_finite_logits_are_an_error_that_names_the_images(tmp_path):
    paths = [write_image(str(tmp_path / "a.png"), 32), write_image(str(tmp_path / "b.png"), 40),
             write_image(str(tmp_path / "c.png"), 32, seed=1)]
    samples = [Sample(p, i % 2) for i, p in enumerate(paths)]
    scoring = ScoringSet(samples, EvalTransform(None), 4, Context(), workers=0)
    with pytest.raises(NonFiniteScoreError, match=r"1 of 3 image\(s\) \(.*b\.png\)"):
        scoring.run(NanForWideImages())
    fine = ScoringSet(samples[::2], EvalTransform(None), 4, Context(), workers=0)
    assert fine.run(NanForWideImages())["margins"] == [1.0, 1.0]


def test_videos_are_ranked_by_the_log_odds_of_their_mean_probability():
    # One frame per video: margins 40-50 (fakes) and 38 (a real) all have mean probability 1.0
    # in float64; their log-odds keep the order.
    loader = [_batch([[0.0, 40.0], [0.0, 45.0], [0.0, 50.0], [0.0, 38.0], [5.0, 0.0]],
                     [1, 1, 1, 0, 0], 0)]
    scored = score(LogitsInPixels(), loader, Context())
    samples = [Sample(f"v{i}/0.png", y, f"v{i}") for i, y in enumerate(scored["labels"])]
    video = metrics_of(scored, samples)["video"]
    assert video["auc"] == 1.0 and video["eer"] == 0.0 and video["acc"] == 0.8
    # It is the log-odds of the mean probability where that can be formed.
    margins = [-1.5, 0.3, 2.0]
    mean = sum(1 / (1 + math.exp(-m)) for m in margins) / 3
    assert math.isclose(mean_probability_log_odds(margins), math.log(mean / (1 - mean)),
                        rel_tol=1e-12)
