"""Tiny random-weight diffusion models for the zoo: GroupNorm everywhere, attention, skip concats.

    python tools/zoo_diffusion.py --out .zoo                 # every model, both exporters
    python tools/zoo_diffusion.py --out .zoo unet2d          # one

Built from diffusers configs (nothing is downloaded): a UNet2DModel (ResNet blocks with a time
embedding, self-attention), a UNet2DConditionModel (cross-attention to a text context) and the
decoder of an AutoencoderKL. Every export is cached like the rest of the zoo. The zoo's small
GroupNorm CNN (``group_norm`` in tools/zoo.py) is built here too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import zoo

DIFFUSION = ("unet2d", "unet2d_condition", "vae_decoder")
# wide enough that a group is several channels and a block has heads to lose; small enough that
# an export and a prune take a few seconds
_COMMON = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8}
_SIDE = 16
_TEXT = (1, 8, 32)  # batch, tokens, cross_attention_dim
_LATENT = (1, 4, 8, 8)


def export_diffusion(name: str, exporter: str, out_dir: Path) -> Path:
    """Export one of ``DIFFUSION`` with ``exporter`` ("legacy" or "dynamo"); cached."""
    if name not in DIFFUSION:
        raise ValueError(f"unknown diffusion model {name!r}; one of {DIFFUSION}")
    return zoo._cached_transformer(
        Path(out_dir) / "diffusion" / f"{name}-{exporter}.onnx", lambda tmp: _export(name, exporter, tmp)
    )


def build(name: str):
    """(module, example inputs, input names) with random weights and random norm affines."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    timestep = torch.tensor([10.0])
    if name == "unet2d":
        unet = UNet2DModel(
            sample_size=_SIDE,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            **_COMMON,
        )
        module = _Sample(unet)
        inputs = (torch.randn(1, 3, _SIDE, _SIDE), timestep)
        names = ["sample", "timestep"]
    elif name == "unet2d_condition":
        unet = UNet2DConditionModel(
            sample_size=_SIDE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TEXT[2],
            attention_head_dim=8,
            **_COMMON,
        )
        module = _Sample(unet)
        inputs = (torch.randn(1, 4, _SIDE, _SIDE), timestep, torch.randn(*_TEXT))
        names = ["sample", "timestep", "encoder_hidden_states"]
    else:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=_LATENT[1],
            sample_size=_SIDE,
            **_COMMON,
        )
        module = _Decode(vae)
        inputs = (torch.randn(*_LATENT),)
        names = ["latent"]
    _randomise_affines(module)
    return module.eval(), inputs, names


def _export(name: str, exporter: str, tmp: Path) -> None:
    import torch

    module, inputs, names = build(name)
    if exporter == "dynamo":
        torch.onnx.export(module, inputs, str(tmp), dynamo=True, verbose=False, input_names=names)
    else:
        torch.onnx.export(
            module, inputs, str(tmp), dynamo=False, opset_version=17, input_names=names, output_names=["output"]
        )


def group_norm_cnn():
    """A CNN normalised by GroupNorm, as diffusion models and detection necks are: groups of 4
    channels around a residual block, and one GroupNorm of one channel per group (an InstanceNorm)."""
    import torch
    from torch import nn

    def block(cin, cout, groups, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(groups, cout), nn.SiLU())

    class GroupNormCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a = block(3, 32, 8), block(32, 32, 8)
            self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32))
            self.down = block(32, 64, 64, stride=2)
            self.head = nn.Conv2d(64, 3, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.head(self.down(torch.nn.functional.silu(x + self.b(self.a(x)))))

    model = GroupNormCNN()
    _randomise_affines(model)
    return model


def _Sample(unet):
    import torch

    class Sample(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, *args):
            return self.unet(*args, return_dict=False)[0]

    return Sample()


def _Decode(vae):
    import torch

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return Decode()


def _randomise_affines(module) -> None:
    """Fresh GroupNorms have weight 1 and bias 0, which would let a wrong affine cut pass unseen."""
    import torch

    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.GroupNorm | torch.nn.LayerNorm) and norm.weight is not None:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.2, 0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(DIFFUSION)} (default: all)")
    args = parser.parse_args(argv)
    for name in args.names or DIFFUSION:
        for exporter in zoo.EXPORTERS:
            print(export_diffusion(name, exporter, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
