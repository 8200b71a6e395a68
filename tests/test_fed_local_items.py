"""Local work on the items in federated pretraining (``item_local_steps``): the upload is the sum
of the E0-row gradients along the device's local path, by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sparse_downloads import _setup

from peel_fed.fedlightgcn import FedLightGCNConfig, round_participants


def _round(steps: int, item_lr: float, user_lr: float = 0.0):
    _, server, devices = _setup(item_local_steps=steps, item_local_lr=item_lr, user_lr=user_lr)
    hosted = np.array([0, 7, 50, 121, 200])
    part = round_participants(0, hosted, 1, 2)
    return devices(hosted).device_round(part, server.item_layers(), 1)


def test_with_nothing_moving_the_upload_is_steps_times_the_first_gradient():
    one, three = _round(1, 0.0), _round(3, 0.0)
    np.testing.assert_array_equal(one.rows, three.rows)
    torch.testing.assert_close(three.grad, 3 * one.grad)


def test_moving_the_rows_changes_the_later_gradients():
    # SGD on the row copies: the gradient at the moved rows differs from the first one
    one, moved = _round(1, 0.0), _round(3, 0.5)
    assert not torch.allclose(moved.grad, 3 * one.grad, rtol=1e-3, atol=1e-6)


def test_item_local_steps_out_of_range_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"item-local-steps must be in \[1, local-steps=3\]"):
        FedLightGCNConfig(local_steps=3, item_local_steps=4)
    with pytest.raises(ValueError, match="item-local-steps"):
        FedLightGCNConfig(item_local_steps=0)
