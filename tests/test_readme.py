"""The README's examples run as written, so the documentation cannot silently rot.

Every ```python block of README.md is executed, in order, in one namespace, after a small preamble
that defines the placeholders the examples use (``MyNet`` with a ``conv3`` block, ``task_loss``,
``x``, ``y``, ``DDP``); then what each example promises is checked on the objects it made. The
distributed block runs as ``torchrun`` would start it with one process: the environment variables
are set and the backend is gloo (the block's own comment names it for CPU tensors; NCCL needs GPUs).
The shell examples are parsed with the real ``normlab`` argument parser, and the configs,
experiments and ``--set`` overrides they name must exist and validate.
"""

from __future__ import annotations

import re
import shlex
import socket
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)


def _blocks(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [
        textwrap.dedent(m.group("body")) for m in _FENCE.finditer(text) if m.group("lang") == lang
    ]


PREAMBLE = '''
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class MyNet(nn.Module):
    """A user's CNN: conv blocks named conv1..conv3 (conv, BatchNorm, ReLU), then a classifier."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.conv1 = block(3, 8)
        self.conv2 = block(8, 8)
        self.conv3 = block(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv3(self.conv2(self.conv1(x)))
        return self.fc(h.mean((2, 3)))


task_loss = F.cross_entropy
x = torch.randn(8, 3, 6, 6)
y = torch.randint(0, 10, (8,))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_has_the_documented_examples():
    blocks = _blocks("python")
    assert len(blocks) >= 8, "README python examples went missing"
    joined = "\n".join(blocks)
    for needle in (
        "make_norm",
        "convert(",
        "convert_conv(",
        "WSConv2d",
        "BCNorm",
        "StandardizationLoss",
        "MixtureNorm",
        "ModeNorm",
        "IterNorm",
        "sync_stats",
    ):
        assert needle in joined, needle


def test_readme_method_table_names_real_layers():
    # the first table maps each paper to registry names and classes: all of them must exist
    text = README.read_text(encoding="utf-8")
    rows = [
        line
        for line in text.split("| method |", 1)[1].split("\n\n", 1)[0].splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) >= 5
    names = [n for row in rows for n in re.findall(r"`([^`]+)`", row.rsplit("|", 2)[1])]
    registry = normlab.available_norms()
    for n in names:
        assert n in registry or isinstance(getattr(normlab, n, None), type), n
    assert {"mixture", "mode", "mgn", "iternorm", "dbn", "bcn"} <= set(names)


def test_readme_python_examples_run_and_do_what_they_say(monkeypatch, capsys):
    blocks = _blocks("python")
    ns: dict = {"__name__": "readme"}
    exec(compile(PREAMBLE, "<readme preamble>", "exec"), ns)
    dist_blocks = [b for b in blocks if "init_process_group" in b]
    assert len(dist_blocks) == 1
    for i, block in enumerate(blocks):
        code = block
        if block in dist_blocks:
            # torchrun's environment for one process, and the CPU backend
            for k, v in {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
            }.items():
                monkeypatch.setenv(k, v)
            code = block.replace('init_process_group("nccl")', 'init_process_group("gloo")')
            assert code != block
            ns["model_before_ddp"] = ns["model"]
        try:
            exec(compile(code, f"<README.md python block {i}>", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"README python block {i} failed:\n{block}") from e
        finally:
            if torch.distributed.is_initialized():  # never leak a process group to other tests
                torch.distributed.destroy_process_group()
        if block in dist_blocks:
            assert isinstance(ns["model"], nn.parallel.DistributedDataParallel)
            synced = normlab.synced_layers(ns["model"].module)
            assert ns["model"].module is ns["model_before_ddp"]
            # torch's BatchNorms become normlab's (as SyncBatchNorm's converter does); the
            # MixtureNorm placed by the first example is synchronised as well
            assert synced == ["conv1.1", "conv2.1", "conv3.1"]
    capsys.readouterr()

    # "Using the layers": the specs build what they name; conv3's BN became the mixture of
    # Kalayeh & Shah, Table 2 (MN-1) and every conv is weight-standardized
    assert isinstance(ns["norm"], normlab.MixtureNorm) and ns["norm"].num_features == 64
    assert ns["norm"].k == 5
    net = ns["model_before_ddp"]
    assert isinstance(net.conv3[1], normlab.MixtureNorm) and net.conv3[1].k == 3
    bn_types = nn.modules.batchnorm._BatchNorm
    assert isinstance(net.conv1[1], bn_types) and isinstance(net.conv2[1], bn_types)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(isinstance(m, normlab.WSConv2d) for m in convs)

    # Weight Standardization: same signature as nn.Conv2d, the ablation flags
    conv, abl = ns["conv"], ns["ablation"]
    assert isinstance(conv, normlab.WSConv2d) and conv.weight.shape == (128, 64, 3, 3)
    assert conv.bias is None and conv.padding == (1, 1)
    assert (abl.center, abl.scale) == (True, False)
    w = conv.standardized_weight().detach().reshape(128, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(128), atol=1e-5, rtol=0)

    # BCN: default groups min(32, C // 4); micro-batch mode; the rate follows the optimizer
    assert isinstance(ns["bcn"], normlab.BCNorm) and ns["bcn"].num_groups == 32
    assert ns["micro"].micro_batch and not ns["bcn"].micro_batch
    assert normlab.set_bcn_rate(nn.Sequential(ns["micro"]), ns["optimizer"]) == 1
    assert ns["micro"].rate == pytest.approx(0.1)

    # Standardization loss: it was added to the task loss, then the hooks were removed
    loss, std_loss = ns["loss"], ns["std_loss"]
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    assert std_loss.names == ["conv1.0", "conv2.0", "conv3.0"]  # every Conv, not the last Linear
    assert not std_loss._handles  # remove() detached them
    assert all(len(net.get_submodule(n)._forward_hooks) == 0 for n in std_loss.names)
    with torch.no_grad():
        net.train()
        task_only = F.cross_entropy(net(ns["x"]), ns["y"])
    assert loss.item() > task_only.item()  # the KL term of Eq. 2 is positive

    # IterNorm.fold: the 1x1 convolution computes what the layer computes in eval mode
    it, conv1x1 = ns["it"].eval(), ns["conv1x1"]
    assert isinstance(conv1x1, nn.Conv2d) and conv1x1.kernel_size == (1, 1)
    xin = torch.randn(2, 128, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(conv1x1(xin), it(xin), atol=1e-4, rtol=1e-4)

    # the remaining layers run on both ranks and keep the shape
    for name in ("mn", "mode", "mgn", "it", "dbn"):
        layer = ns[name]
        assert isinstance(layer, nn.Module), name
        layer.train()
        for shape in ((16, 128), (4, 128, 3, 3)):
            out = layer(torch.randn(shape))
            assert out.shape == shape and torch.isfinite(out).all(), name
    assert isinstance(ns["mn"], normlab.MixtureNorm) and ns["mn"].k == 3
    assert isinstance(ns["mode"], normlab.ModeNorm) and isinstance(ns["mgn"], normlab.ModeGroupNorm)
    assert isinstance(ns["it"], normlab.IterNorm) and isinstance(ns["dbn"], normlab.DBN)


# ---------------------------------------------------------------------------------- shell


def _shell_commands() -> list[list[str]]:
    """The ``normlab ...`` invocations of the README's bash blocks (also under torchrun's
    ``-m normlab.cli``), as argument lists without the program name."""
    cmds = []
    for block in _blocks("bash"):
        text = re.sub(r"\\\n", " ", block)
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            for part in line.split("&&"):
                words = shlex.split(part)
                for j, w in enumerate(words):
                    if (w == "normlab" and j == 0) or (w == "normlab.cli" and words[j - 1] == "-m"):
                        cmds.append(words[j + 1 :])
                        break
    return cmds


def test_readme_shell_examples_parse_and_name_real_files():
    from normlab.cli import build_parser
    from normlab.experiments import load_experiment
    from normlab.train import load_config

    cmds = _shell_commands()
    assert {c[0] for c in cmds} >= {"quickstart", "train", "run", "report"}
    parser = build_parser()
    for argv in cmds:
        args = parser.parse_args(argv)  # SystemExit (exit code 2) on an unknown option
        assert callable(getattr(args, "func", None)), argv
        sets = getattr(args, "set", None) or []
        if argv[0] == "train" and args.config.startswith("experiments/"):
            load_config(ROOT / args.config, sets)  # the file exists and the overrides validate
        elif argv[0] == "train":
            load_config(None, sets)
        if argv[0] == "run" and args.experiment:
            exp = load_experiment(args.experiment)  # a real experiment name
            assert args.scale in ("small", "full")
            exp.config(exp.variants_at(args.scale)[0], args.scale, extra=sets)
