"""Instance-norm kernels on the CPU, side by side: per layer shape and for the whole network (issue #13).

Per layer (default): forward + backward (``--forward-only``: forward alone, no autograd) of every norm-layer shape
of a network built from the plans (batch ``--batch-size``), for each way of computing instance norm, as a ratio to
torch's instance norm on the contiguous map (1.00; its time in ms in the last column):

    in_c        F.instance_norm on the contiguous map (nnU-Net's InstanceNorm3d)
    gn_c        F.group_norm with one channel per group, contiguous (nnsnake's CPU path with channels-last off)
    gn_cl       the same on the channels-last map (nnsnake's CPU path before #13)
    in_cl       F.instance_norm on the channels-last map (reshapes through batch norm: copies, contiguous output)
    copy_cl     instance norm on a contiguous copy of the channels-last map, the result copied back
    ops_cl      plain tensor ops (var_mean, rsqrt, addcmul) on the channels-last map, autograd's backward
    bn_cl       F.batch_norm per sample on the channels-last map, torch.cat of the results
    new_cl      nnsnake's InstanceNorm on the channels-last map (network._ChannelsLastInstanceNorm)

``--network`` times instead a forward + backward of the whole network (deep supervision on, a random gradient per
head) in each layout (``cl`` channels-last, ``c`` contiguous) with the old (group norm) or the current norm:
process CPU time, minimum over ``--repeats`` interleaved rounds, ratio to the first variant.

    python benchmarks/norm_layers.py                                   # ResEnc M Hippocampus 3d_fullres
    python benchmarks/norm_layers.py --plans nnUNetPlans --config 2d --batch-size 32
    python benchmarks/norm_layers.py --network --repeats 5             # cl_old, cl_new, c_old

Measured 2026-12-07 on the 2-core development machine while it ran other training (load 3-9), one thread.
Per layer, forward + backward, ResEnc M Hippocampus 3d_fullres (batch 2), then the plain U-Net's 2d (batch 64):

    shape                x    in_c   gn_c   gn_cl  in_cl  copy_cl  ops_cl  bn_cl  new_cl   in_c ms
    2x32x40x56x40        4    1.00   0.74   2.95   5.06   3.95     4.68    0.91   0.65     25.25
    2x64x20x28x20        8    1.00   0.45   2.88   2.03   2.22     3.26    0.72   0.61      6.80
    2x128x10x14x10      10    1.00   0.34   3.11   2.60   3.19     3.46    0.69   0.66      1.32
    2x256x5x7x5         13    1.00   0.47   3.65   1.97   2.05     2.87    0.85   1.20      0.44
    64x32x56x40          4    1.00   0.41   2.14   1.39   1.60     2.30    0.70   0.55     33.42
    64x64x28x20          4    1.00   0.48   5.10   1.99   2.45     3.71    1.13   1.36      8.53
    64x128x14x10         4    1.00   0.48   4.78   2.09   2.67     3.63    1.64   1.60      4.42
    64x256x7x5           2    1.00   0.78   4.46   1.68   1.85     4.18    1.48   1.67      2.42

Forward alone (``--forward-only``, ResEnc M 3d_fullres): gn_cl 0.42 / 0.16 / 0.14 / 3.75, bn_cl 0.97 / 0.48 /
0.36 / 0.42, new_cl 0.43 / 0.17 / 0.17 / 0.61 (the group-norm kernel goes channel by channel below 1024 voxels).
Whole network (``--network --repeats 5``; 2d: 3 repeats), forward + backward, CPU time relative to cl_old:

    network                                  cl_old  cl_new  c_old
    ResEnc M 3d_fullres, batch 2             1.000   0.946   1.068
    plain U-Net 3d_fullres, batch 2          1.000   0.945   1.083
    plain U-Net 2d, batch 366 (the plans')   1.000   0.766   1.002
    ResEnc M 2d, batch 64                    1.000   0.856   0.892

so channels-last stays the CPU default for every architecture (``training.trainer._runtime``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's nnsnake, whatever is installed

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812

from nnsnake import network as N  # noqa: E402, N812

EPS = 1e-5
Norm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _fmt(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def _ops(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
    shape = (1, -1) + (1,) * len(dims)
    scale = torch.rsqrt(var + EPS) * w.view(shape)
    return torch.addcmul(b.view(shape) - mean * scale, x, scale)


def _new(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``InstanceNorm.forward`` with these tensors as its parameters (no module built per call)."""
    layer = SimpleNamespace(weight=w, bias=b, eps=EPS, num_features=x.shape[1])
    return N.InstanceNorm.forward(layer, x)  # type: ignore[arg-type]


# name -> (channels-last input, function)
LAYER_VARIANTS: dict[str, tuple[bool, Norm]] = {
    "in_c": (False, lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.0, EPS)),
    "gn_c": (False, lambda x, w, b: F.group_norm(x, x.shape[1], w, b, EPS)),
    "gn_cl": (True, lambda x, w, b: F.group_norm(x, x.shape[1], w, b, EPS)),
    "in_cl": (True, lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.0, EPS)),
    "copy_cl": (
        True,
        lambda x, w, b: F.instance_norm(x.contiguous(), None, None, w, b, True, 0.0, EPS).contiguous(
            memory_format=_fmt(x)
        ),
    ),
    "ops_cl": (True, _ops),
    "bn_cl": (
        True,
        lambda x, w, b: torch.cat([F.batch_norm(xi, None, None, w, b, True, 0.0, EPS) for xi in x.split(1)]),
    ),
    "new_cl": (True, _new),
}


def _plans_config(plans: str, config: str) -> dict:
    path = REPO / "tests" / "fixtures" / "nnunetv2" / "Dataset004_Hippocampus" / f"{plans}.json"
    return json.loads(path.read_text())["configurations"][config]


def _norm_shapes(config: dict, batch: int) -> Counter:
    network = N.build_network(config["architecture"], 1, 3)
    shapes: Counter = Counter()
    hooks = [
        m.register_forward_hook(lambda _m, i, _o: shapes.update([tuple(i[0].shape)]))
        for m in network.modules()
        if isinstance(m, N.InstanceNorm)
    ]
    with torch.no_grad():
        network(torch.zeros(1, 1, *config["patch_size"]))
    for h in hooks:
        h.remove()
    return Counter({(batch, *s[1:]): n for s, n in shapes.items()})


def time_layers(config: dict, batch: int, repeats: int, forward_only: bool) -> None:
    print(f"{'shape':22s} {'x':>3s} " + " ".join(f"{v:>7s}" for v in LAYER_VARIANTS) + "   in_c ms")
    for shape, count in sorted(_norm_shapes(config, batch).items(), key=lambda kv: -kv[0][2]):
        torch.manual_seed(0)
        dense, grad = torch.randn(shape) * 3 + 1, torch.randn(shape)
        weight, bias = torch.rand(shape[1]) + 0.5, torch.rand(shape[1]) - 0.5
        inputs = {
            cl: (
                dense.contiguous(memory_format=_fmt(dense)) if cl else dense,
                grad.contiguous(memory_format=_fmt(dense)) if cl else grad,
            )
            for cl in (False, True)
        }
        calls = max(1, int(2e7 / dense.numel()))
        best: dict[str, float] = {}
        for _ in range(repeats):
            for name, (cl, fn) in LAYER_VARIANTS.items():
                x0, g = inputs[cl]
                if forward_only:
                    with torch.no_grad():
                        fn(x0, weight, bias)
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn(x0, weight, bias)
                else:
                    x, w, b = (t.detach().requires_grad_() for t in (x0, weight, bias))
                    fn(x, w, b).backward(g)
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn(x, w, b).backward(g)
                elapsed = (time.perf_counter() - start) / calls
                best[name] = min(best.get(name, float("inf")), elapsed)
        base = best["in_c"]
        label = "x".join(map(str, shape))
        ratios = " ".join(f"{best[v] / base:7.2f}" for v in LAYER_VARIANTS)
        print(f"{label:22s} {count:3d} {ratios}   {base * 1e3:7.2f}", flush=True)


def _old_forward(self: N.InstanceNorm, x: torch.Tensor) -> torch.Tensor:
    """nnsnake's CPU norm before #13: group norm, one channel per group, whatever the layout."""
    return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def time_network(config: dict, batch: int, repeats: int, variants: list[str]) -> None:
    new_forward = N.InstanceNorm.forward
    torch.manual_seed(0)
    network = N.build_network(config["architecture"], 1, 3)
    x = torch.randn(batch, 1, *config["patch_size"])
    fmt = N.channels_last_format(len(config["patch_size"]))
    with torch.no_grad():
        grads = [torch.randn(o.shape) for o in network(x)]

    def step(variant: str) -> float:
        layout, norm = variant.split("_")
        N.InstanceNorm.forward = new_forward if norm == "new" else _old_forward  # type: ignore[method-assign]
        network.to(memory_format=fmt if layout == "cl" else torch.contiguous_format)  # type: ignore[call-overload]
        inp = x.contiguous(memory_format=fmt) if layout == "cl" else x
        network.zero_grad(set_to_none=True)
        start = time.process_time()
        loss = sum((o * g).sum() for o, g in zip(network(inp), grads, strict=True))
        loss.backward()
        return time.process_time() - start

    try:
        for v in variants:  # warm-up
            step(v)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(repeats):
            for v in variants if r % 2 == 0 else variants[::-1]:
                times[v].append(step(v))
    finally:
        N.InstanceNorm.forward = new_forward  # type: ignore[method-assign]
    base = min(times[variants[0]])
    for v in variants:
        t = sorted(times[v])
        print(
            f"{v:8s} min {t[0]:7.3f} s  median {t[len(t) // 2]:7.3f} s  ratio {t[0] / base:5.3f}", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--plans", default="nnUNetResEncUNetMPlans", help="plans fixture of Dataset004_Hippocampus"
    )
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep it fixed between runs)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the minimum counts")
    parser.add_argument("--forward-only", action="store_true", help="per layer: forward alone, no autograd")
    parser.add_argument("--network", action="store_true", help="whole network instead of single layers")
    parser.add_argument("--variants", default="cl_old,cl_new,c_old", help="with --network: layout_norm list")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = _plans_config(args.plans, args.config)
    print(
        f"{args.plans} {args.config} patch {config['patch_size']} batch {args.batch_size}, {args.threads} thread(s)"
    )
    if args.network:
        time_network(config, args.batch_size, args.repeats, args.variants.split(","))
    else:
        time_layers(config, args.batch_size, args.repeats, args.forward_only)


if __name__ == "__main__":
    main()
