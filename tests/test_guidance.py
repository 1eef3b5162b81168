"""The guidance-normalised targets (recare-method.md §3) against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from recare_cli.erase.guidance import (
    GuidanceKnobs, MomentumBuffer, compositional_target, proj, single_negative_target, update,
)


def t4(*values) -> torch.Tensor:
    """A [1, C, 1, 1] tensor: projections act over (C, H, W)."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_proj_splits_into_parallel_and_orthogonal_parts():
    d_par, d_orth = proj(t4(3.0, 4.0), t4(2.0, 0.0))
    assert torch.allclose(d_par, t4(3.0, 0.0))
    assert torch.allclose(d_orth, t4(0.0, 4.0))


def test_proj_is_per_sample():
    d = torch.cat([t4(1.0, 1.0), t4(1.0, 1.0)])
    p = torch.cat([t4(0.3, 0.4), t4(0.0, 2.0)])  # norms 0.5 and 2: p_hat = (0.6, 0.8) and (0, 1)
    d_par, d_orth = proj(d, p)
    assert d_par.shape == d_orth.shape == d.shape
    # d . p_hat = 1.4 and 1
    assert torch.allclose(d_par, torch.cat([t4(1.4 * 0.6, 1.4 * 0.8), t4(0.0, 1.0)]))


def test_update_weights_the_parallel_part_by_eta():
    d, p = t4(3.0, 4.0), t4(1.0, 0.0)
    assert torch.allclose(update(d, p), d)
    assert torch.allclose(update(d, p, GuidanceKnobs(eta=0.5)), t4(1.5, 4.0))


def test_update_clips_the_norm_when_a_threshold_is_set():
    d = t4(3.0, 4.0)  # norm 5
    assert torch.allclose(update(d, t4(1.0, 0.0), GuidanceKnobs(norm_threshold=2.5)), t4(1.5, 2.0))
    assert torch.allclose(update(d, t4(1.0, 0.0), GuidanceKnobs(norm_threshold=10.0)), d)


def test_update_clips_each_sample_by_its_own_norm():
    d = torch.cat([t4(3.0, 4.0), t4(0.0, 0.4)])  # norms 5 and 0.4
    p = torch.cat([t4(1.0, 0.0), t4(1.0, 0.0)])
    # threshold 0.5: the first shrinks to norm 0.5, the second is already below it and stays
    assert torch.allclose(update(d, p, GuidanceKnobs(norm_threshold=0.5)), torch.cat([t4(0.3, 0.4), t4(0.0, 0.4)]))
    # the norm is over (C, H, W) together, not per pixel
    wide = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    clipped = update(wide, torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), GuidanceKnobs(norm_threshold=2.5))
    assert clipped.shape == wide.shape and torch.allclose(clipped, torch.tensor([1.5, 2.0]).view(1, 1, 1, 2))

def test_momentum_accumulates_the_direction():
    buffer = MomentumBuffer(0.5)
    update(t4(1.0, 0.0), t4(1.0, 0.0), GuidanceKnobs(momentum=0.5), buffer)
    second = update(t4(1.0, 0.0), t4(1.0, 0.0), GuidanceKnobs(momentum=0.5), buffer)
    assert torch.allclose(second, t4(1.5, 0.0))


def test_negative_guidance_two_gives_the_neutral_prediction():
    eps_pos, eps_neu = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    assert torch.allclose(single_negative_target(eps_pos, eps_neu, 2.0), eps_neu, atol=1e-6)
    assert torch.allclose(single_negative_target(eps_pos, eps_neu, 1.0), eps_pos)


def test_single_negative_target_by_hand():
    eps_pos, eps_neu = t4(2.0, 0.0), t4(1.0, 1.0)
    # d = (1, -1); parallel to eps_pos: (1, 0), orthogonal: (0, -1); eta 0.5 -> (0.5, -1)
    target = single_negative_target(eps_pos, eps_neu, 3.0, GuidanceKnobs(eta=0.5))
    assert torch.allclose(target, t4(2.0 - 2 * 0.5, 0.0 + 2 * 1.0))


def test_single_negative_target_carries_the_momentum_buffer():
    buffer = MomentumBuffer(0.5)
    eps_neu = t4(0.0, 0.0)
    assert torch.allclose(single_negative_target(t4(1.0, 0.0), eps_neu, 2.0, buffer=buffer), eps_neu)
    # d = (0, 1) + 0.5 * (1, 0) = (0.5, 1): the first step's direction carries over
    assert torch.allclose(single_negative_target(t4(0.0, 1.0), eps_neu, 2.0, buffer=buffer), t4(-0.5, 0.0))

def test_compositional_target_by_hand():
    eps_neu = t4(0.0, 0.0)
    eps_erase_1, eps_erase_2, eps_anchor = t4(1.0, 0.0), t4(0.0, 2.0), t4(3.0, 3.0)
    target = compositional_target([eps_erase_1, eps_erase_2, eps_anchor], eps_neu, [-2.0, -2.0, 2.0])
    # P = (2 - 1) * (3, 3); N = mean of (-3) * (1, 0) and (-3) * (0, 2) = (-1.5, -3)
    assert torch.allclose(target, t4(3.0 - 1.5, 3.0 - 3.0))


def test_compositional_target_without_anchor_is_neutral_plus_negative_mean():
    eps_neu = t4(1.0, 1.0)
    target = compositional_target([t4(2.0, 1.0)], eps_neu, [-2.0])
    assert torch.allclose(target, t4(1.0 - 3.0, 1.0))


def test_compositional_target_groups_by_sign_for_scales_below_one():
    # --compositional-guidance-scale 0.5: the anchor (s = +0.5) still counts as positive, its (s - 1) negative.
    eps_erase, eps_anchor = t4(1.0, 0.0), t4(0.0, 1.0)
    target = compositional_target([eps_erase, eps_anchor], t4(0.0, 0.0), [-0.5, 0.5])
    # P = (0.5 - 1) * (0, 1); N = (-0.5 - 1) * (1, 0): each the mean of its own group of one
    assert torch.allclose(target, t4(-1.5, -0.5))


def test_compositional_target_needs_one_scale_per_condition():
    with pytest.raises(ValueError):
        compositional_target([t4(1.0, 0.0), t4(0.0, 1.0)], t4(0.0, 0.0), [-2.0])


def test_compositional_target_keeps_one_momentum_buffer_per_condition():
    buffers = [MomentumBuffer(0.5), MomentumBuffer(0.5)]
    eps_neu = t4(0.0, 0.0)
    first = compositional_target([t4(1.0, 0.0), t4(0.0, 1.0)], eps_neu, [-2.0, 2.0], buffers=buffers)
    assert torch.allclose(first, t4(-3.0, 1.0))  # (-3) * (1, 0) + 1 * (0, 1): nothing accumulated yet
    second = compositional_target([t4(0.0, 2.0), t4(2.0, 0.0)], eps_neu, [-2.0, 2.0], buffers=buffers)
    # erase: (0, 2) + 0.5 * (1, 0) = (0.5, 2); anchor: (2, 0) + 0.5 * (0, 1) = (2, 0.5)
    assert torch.allclose(second, t4(2.0 - 3 * 0.5, 0.5 - 3 * 2.0))
