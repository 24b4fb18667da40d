"""bf16 autocast training: the losses and gradients stay close to float32's, and the loop trains under it."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from recmodels.base import dot_product_cross_entropy, mask_padding_column
from test_models import build, make_batch
from training.config import TrainConfig
from training.precision import autocast, grad_scaler
from training.steps import LossModel, train_epoch


def test_precision_settings_are_checked():
    assert TrainConfig(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        TrainConfig(precision="fp16")
    assert TrainConfig(precision="fp16", gpus_per_worker=1).precision == "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="int8")


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product that runs inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_fused_loss_under_bf16_autocast_is_bf16_matmuls_with_float32_softmax():
    """Under autocast all three matmuls of the fused loss (logits, both gradients) run in bf16 (its
    speed-up) while the softmax and log-sum-exp stay float32: the loss is autograd's CE over bf16 logits."""
    torch.manual_seed(0)
    queries = torch.randn(300, 16, requires_grad=True)
    table = torch.randn(200, 16, requires_grad=True)
    targets = torch.randint(1, 200, (300,))
    with autocast("bf16", "cpu"), MatmulDtypes() as matmuls:
        fused = dot_product_cross_entropy(queries, table, targets, rows_per_chunk=64)
    assert len(matmuls.seen) == 3 * 5  # 5 chunks of 64 rows
    assert all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in matmuls.seen), matmuls.seen
    rounded = (queries.bfloat16() @ table.bfloat16().T).float()
    torch.testing.assert_close(fused, F.cross_entropy(mask_padding_column(rounded), targets), rtol=1e-5, atol=1e-5)
    with MatmulDtypes() as matmuls:  # and without autocast, float32 throughout
        dot_product_cross_entropy(queries, table, targets, rows_per_chunk=64)
    assert {dtypes for dtypes in matmuls.seen} == {(torch.float32, torch.float32)}


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
    errors = {name: ((h - f).norm() / f.norm()).item()
              for (name, _), h, f in zip(model.named_parameters(), half_grads, full_grads) if f.norm() > 0}
    assert sorted(errors.values())[len(errors) // 2] < 0.05  # the median parameter's gradient
    assert errors["item_embedding.weight"] < 0.05  # the fused loss's own gradient output


def test_training_epochs_under_bf16_lower_the_loss():
    torch.manual_seed(0)
    model = build("sasrec", hidden_size=32)
    batches = [make_batch(batch_size=32, seed=seed) for seed in range(4)]
    initial = {name: value.clone() for name, value in model.state_dict().items()}

    def epochs(precision):
        model.load_state_dict(initial)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        scaler = grad_scaler(precision, "cpu")
        torch.manual_seed(1)  # the same dropout masks
        return [train_epoch(LossModel(model), optimizer, batches, lambda step: None, precision, scaler)["loss"]
                for _ in range(15)]

    half, full = epochs("bf16"), epochs("fp32")
    assert half != full  # the loop did autocast
    assert all(torch.isfinite(torch.tensor(half)))
    assert half[-1] < 0.8 * half[0]
    assert half[-1] == pytest.approx(full[-1], rel=0.05)
