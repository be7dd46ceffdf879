"""RA-Seg network: shapes, the attention and ConvLSTM paths, and that it can learn."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from radnode.models.raseg import (
    ARCHITECTURE_NAME,
    RASeg,
    RASegConfig,
    RecurrentBlock,
    TumourAttention,
    count_parameters,
)

TINY = RASegConfig(channels=(8, 16, 32, 64))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.mark.parametrize("size", [(19, 23, 17), (8, 9, 33)])
def test_output_shape_for_odd_sizes(size: tuple[int, int, int]) -> None:
    model = RASeg(TINY).eval()
    image = torch.randn(2, 1, *size)
    with torch.no_grad():
        logits = model(image, torch.ones_like(image))
    assert logits.shape == (2, TINY.out_channels, *size)
    assert torch.isfinite(logits).all()


def test_faithful_configuration_shape_and_layout() -> None:
    config = RASegConfig()
    assert config.channels == (64, 128, 256, 512) and config.dropout == 0.1
    model = RASeg(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 5, 6, 7), torch.ones(1, 1, 5, 6, 7))
    assert logits.shape == (1, 2, 5, 6, 7)
    # Encoder convolutions produce the configured widths; InstanceNorm, PReLU and spatial
    # dropout are the blocks used.
    widths = [enc.conv.unit0.conv.out_channels for enc in model.encoders] + [model.bottom.conv.unit0.conv.out_channels]
    assert widths == list(config.channels)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"InstanceNorm3d", "PReLU", "Dropout3d"} <= kinds
    # Three ConvLSTM layers with hidden = channels and 3x3 kernels at the bottleneck.
    c, k = config.channels[-1], config.convlstm_kernel
    assert len(model.recurrent.cells) == 3
    per_layer = (2 * c) * 4 * c * k * k + 4 * c
    assert count_parameters(model.recurrent) == 3 * per_layer
    assert model.feature_stage is model.decoders[1]
    print(f"RA-Seg faithful parameters: {count_parameters(model):,}")


def test_attention_path_changes_output_when_box_changes() -> None:
    image = torch.randn(1, 1, 16, 16, 16)
    box_a = torch.zeros_like(image)
    box_a[..., 2:8, 2:8, 2:8] = 1
    box_b = torch.zeros_like(image)
    box_b[..., 8:14, 8:14, 8:14] = 1
    with torch.no_grad():
        with_attention = RASeg(TINY).eval()
        assert not torch.allclose(with_attention(image, box_a), with_attention(image, box_b))
        without = RASeg(RASegConfig(channels=TINY.channels, attention=False)).eval()
        assert torch.equal(without(image, box_a), without(image, box_b))


def test_attention_module_formula_and_zeroed_identity() -> None:
    module = TumourAttention(channels=4)
    features = torch.randn(1, 4, 6, 6, 6)
    box = torch.zeros(1, 1, 12, 12, 12)
    box[..., 3:9, 0:5, 6:12] = 1
    with torch.no_grad():
        pooled = torch.nn.functional.avg_pool3d(box, 2)  # 12 -> 6: 2x2x2 means
        expected = features + torch.sigmoid(module.conv(pooled)) * features
        assert torch.allclose(module(features, box), expected, atol=1e-6)
        module.conv.weight.zero_()
        module.conv.bias.zero_()
        # sigmoid(0) = 1/2: f + f/2 whatever the box.
        assert torch.allclose(module(features, box), 1.5 * features)
        assert torch.allclose(module(features, torch.zeros_like(box)), 1.5 * features)


def test_zeroed_attention_makes_the_network_ignore_the_box() -> None:
    model = RASeg(TINY).eval()
    with torch.no_grad():
        for module in model.attention:
            module.conv.weight.zero_()
            module.conv.bias.zero_()
        image = torch.randn(1, 1, 16, 16, 16)
        box = torch.zeros_like(image)
        box[..., 4:10, 4:10, 4:10] = 1
        assert torch.allclose(model(image, box), model(image, torch.ones_like(image)), atol=1e-6)


def test_convlstm_carries_information_along_depth_only_forwards() -> None:
    block = RecurrentBlock(channels=4, layers=3, kernel_size=3).eval()
    x = torch.randn(1, 4, 6, 5, 5)
    first = x.clone()
    first[:, :, 0] += 1.0
    last = x.clone()
    last[:, :, -1] += 1.0
    with torch.no_grad():
        base, after_first, after_last = block(x), block(first), block(last)
    assert base.shape == x.shape
    # Each depth slice is one time step; 2-D cells do not mix depth, so only the recurrence
    # can carry the change at slice 0 to the last slice...
    assert (after_first[:, :, -1] - base[:, :, -1]).abs().max() > 1e-4
    # ... and it runs from slice 0 onwards: a change at the last slice touches nothing before.
    assert torch.equal(after_last[:, :, :-1], base[:, :, :-1])


def _sphere_case(n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij")
    label = ((z - 14.3) ** 2 + (y - 17.1) ** 2 + (x - 15.6) ** 2 <= 7.5**2).float()[None, None]
    image = label + 0.5 * torch.randn(label.shape, generator=g)
    box = torch.zeros_like(label)
    idx = label[0, 0].nonzero()
    lo, hi = idx.min(0).values - 2, idx.max(0).values + 3
    box[0, 0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return image, box, label


def test_overfits_one_synthetic_case() -> None:
    image, box, label = _sphere_case()
    model = RASeg(TINY)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    dice = 0.0
    for step in range(300):
        model.train()
        optimiser.zero_grad()
        loss = loss_fn(model(image, box), label)
        loss.backward()
        optimiser.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                pred = model(image, box).argmax(1, keepdim=True).float()
            dice = float(2 * (pred * label).sum() / (pred.sum() + label.sum()))
            if dice > 0.95:
                break
    assert dice > 0.9, f"Dice {dice:.3f} after {step + 1} steps"


def test_config_round_trip_and_validation() -> None:
    data = TINY.to_dict()
    assert data["name"] == ARCHITECTURE_NAME
    assert RASegConfig.from_dict(data) == TINY
    with pytest.raises(ValueError, match="widht"):
        RASegConfig.from_dict({**data, "widht": 3})
    with pytest.raises(ValueError, match="strides"):
        RASegConfig.from_dict({**data, "strides": [2, 2]})
    with pytest.raises(ValueError, match="name"):
        RASegConfig.from_dict({**data, "name": "UNet"})
    with pytest.raises(ValueError, match="bbox"):
        RASeg(TINY)(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 7))
