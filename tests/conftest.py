import copy
import os

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter, which must be chosen before triton is
# imported (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = os.path.join(os.path.dirname(__file__), "data")


def tiny_config(head="ATMHead", img_size=64, num_classes=5, embed_dims=32, num_layers=4, heads=2,
                head_layers=2, out_indices=None, shrink_idx=2, drop_path_rate=0.0, stride=None):
    """A small original-style ``model`` dict (any sizes build, as the contract requires)."""
    shrunk = head == "TPNATMHead"
    backbone = {"type": "vit_shrink" if shrunk else "VisionTransformer", "img_size": [img_size, img_size],
                "patch_size": 16, "in_channels": 3, "embed_dims": embed_dims, "num_layers": num_layers,
                "num_heads": heads, "drop_path_rate": drop_path_rate, "attn_drop_rate": 0.0, "drop_rate": 0.0,
                "out_indices": out_indices or ([1, num_layers - 1] if shrunk else [1, 2, num_layers - 1]),
                "final_norm": False, "norm_cfg": {"type": "LN", "eps": 1e-6, "requires_grad": True},
                "with_cls_token": False, "interpolate_mode": "bicubic"}
    if shrunk:
        backbone["shrink_idx"] = shrink_idx
    decode_head = {"type": head, "img_size": img_size, "in_channels": embed_dims, "channels": embed_dims,
                   "num_classes": num_classes, "num_layers": head_layers, "num_heads": heads,
                   "use_stages": len(backbone["out_indices"]), "embed_dims": embed_dims // 2,
                   "loss_decode": {"type": "ATMLoss", "num_classes": num_classes, "dec_layers": 3,
                                   "loss_weight": 1.0}}
    stride = stride or img_size * 2 // 3
    return {"type": "EncoderDecoder", "pretrained": None, "backbone": backbone, "decode_head": decode_head,
            "test_cfg": {"mode": "slide", "crop_size": [img_size, img_size], "stride": [stride, stride]}}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with `pytest -m gpu` on a GPU machine)")


@pytest.fixture
def make_config():
    return lambda **kw: copy.deepcopy(tiny_config(**kw))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def parity_data(name):
    return torch.load(os.path.join(DATA, name), weights_only=False)
