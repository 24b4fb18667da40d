"""bf16 autocast training: the losses and gradients stay close to float32's, and the loop trains under it."""
import pytest
import torch
import torch.nn.functional as F

from recmodels.base import dot_product_cross_entropy, mask_padding_column
from test_models import build, make_batch
from training.config import TrainConfig
from training.loop import LossModel, train_epoch
from training.precision import autocast


def test_precision_settings_are_checked():
    assert TrainConfig(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        TrainConfig(precision="fp16")
    assert TrainConfig(precision="fp16", gpus_per_worker=1).precision == "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="int8")


def test_fused_loss_under_bf16_autocast_is_bf16_matmuls_with_float32_softmax():
    """Under autocast the three matmuls of the fused loss run in bf16 (its speed-up) while the softmax
    and log-sum-exp stay float32: equal to autograd's CE over bf16-rounded logits."""
    torch.manual_seed(0)
    queries = torch.randn(300, 16, requires_grad=True)
    table = torch.randn(200, 16, requires_grad=True)
    targets = torch.randint(1, 200, (300,))
    with autocast("bf16", "cpu"):
        fused = dot_product_cross_entropy(queries, table, targets, rows_per_chunk=64)
    fused_grads = torch.autograd.grad(fused, (queries, table))
    rounded = (queries.bfloat16() @ table.bfloat16().T).float()
    reference = F.cross_entropy(mask_padding_column(rounded), targets)
    reference_grads = torch.autograd.grad(reference, (queries, table))
    exact = F.cross_entropy(mask_padding_column(queries @ table.T), targets)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert (fused - exact).abs() > 1e-6  # it did run in bf16
    for fused_grad, reference_grad in zip(fused_grads, reference_grads):
        assert (fused_grad - reference_grad).norm() / reference_grad.norm() < 1e-2  # bf16 gradient matmuls


@pytest.mark.parametrize("variant", ["sasrec", "fame", "hm4sr"])
def test_bf16_loss_and_gradients_stay_close_to_float32(variant):
    model = build(variant, hidden_size=32).eval()  # dropout off: the same computation both times
    with torch.no_grad():  # logits of a trained model's scale, not init's near-zero ones
        for parameter in model.parameters():
            parameter.mul_(10.0 if parameter.ndim == 2 else 1.0)
    batch = make_batch(batch_size=16)

    def loss_and_grads(precision):
        model.zero_grad()
        with autocast(precision, "cpu"):
            total, _ = model.loss(batch)
        total.backward()
        return total.detach().float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, full_grads = loss_and_grads("fp32")
    half, half_grads = loss_and_grads("bf16")
    assert full != half  # autocast reached the model's matmuls
    assert abs(half - full) / full < 0.02
    errors = [((h - f).norm() / f.norm()).item() for h, f in zip(half_grads, full_grads) if f.norm() > 0]
    assert sorted(errors)[len(errors) // 2] < 0.05  # the median parameter's gradient


def test_training_epochs_under_bf16_lower_the_loss():
    torch.manual_seed(0)
    model = build("sasrec", hidden_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [make_batch(batch_size=32, seed=seed) for seed in range(4)]
    losses = [train_epoch(LossModel(model), optimizer, batches, lambda step: None, "bf16")["loss"] / (4 * 32)
              for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
