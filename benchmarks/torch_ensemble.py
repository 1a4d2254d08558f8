"""The PyTorch peer for training many models at once: functorch model ensembling of the reference U-Net.

What a PyTorch user would write to train M copies of the reference's model side by side on one
device: the members' parameters stacked (``torch.func.stack_module_state``), one member's loss
evaluated through ``torch.func.functional_call`` and mapped over the members with
``torch.func.vmap`` (dropout drawn per member), bf16 autocast around the network, the gradient
function compiled with ``torch.compile``, then per-member gradient clipping and AdamW, as the
reference's training loop does for one model. Nothing here is part of jaxconcept: PyTorch and
the reference are benchmark-only (``pip install torch``; ``--reference`` names a checkout of
github.com/cfpark00/concept-learning, whose CUNet ``reference_torch.build_unet`` builds).

    python benchmarks/torch_ensemble.py --reference /tmp/reference --members 8,32 --json out.json
    python benchmarks/torch_ensemble.py --reference /tmp/reference --tiny --members 2   # CPU, seconds

The loss is the VDM loss of docs/study.md A2 (diffusion + latent + reconstruction terms in bits per
dimension, antithetic times, learned linear log-SNR schedule), written for one member as
jaxconcept's ``vdm.loss_terms`` computes it: the reference's own ``get_loss`` takes
gamma'(t) with ``torch.autograd.grad``, which functorch transforms do not allow; for the linear
schedule gamma'(t) = |w|, so the arithmetic is the same.

With ``--wait-go`` (how ``device_check.py`` runs it beside its own compiles) every model is built
and every step function compiled and warmed up first; then it prints ``@ready`` and waits for one
line on stdin before timing anything, so its timings do not share the device with other work.
Each result is printed as one line ``@row {json}``; ``@done`` ends the run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_torch as R  # noqa: E402

NET = "model.score_model."  # the reference GenVDiff's network (VDM.score_model)
GAMMA = ("model.gamma.b", "model.gamma.w")  # its learned linear schedule gamma(t) = b + |w| t


def _error(exc: BaseException) -> str:
    """An exception in at most 2,000 characters: its start and its end (where compilers put the cause)."""
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= 2000 else msg[:600] + " [...] " + msg[-1400:]


def emit(tag: str, payload=None):
    print(f"@{tag}" + ("" if payload is None else " " + json.dumps(payload)), flush=True)


class Ensemble:
    """M reference models as stacked tensors [M, ...] with one training step for all of them.

    ``step(x, c)``: x [M, B, C, H, W] images, c [M, B, cond_dim] concept vectors -> mean loss [M].
    Each member: VDM loss, gradient, clipping of its own global norm to ``clip``, AdamW."""

    def __init__(self, models, model_cfg, *, lr: float, weight_decay: float, clip: float, dtype: str,
                 compile: bool, p_cfg: float = 0.0):
        import torch
        from torch.func import functional_call, grad_and_value, stack_module_state, vmap

        self.device = next(models[0].parameters()).device
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.m, self.clip, self.p_cfg = len(models), clip, p_cfg
        net = copy.deepcopy(models[0].model.score_model).to("meta")
        net.train()  # dropout on, as the reference trains
        cast = {"bfloat16": torch.bfloat16, "float32": None}[dtype]
        dev_type = self.device.type
        mc = model_cfg

        def member_loss(p, b, x, c, u, eps, eps0):  # one member: p, b its parameters and buffers
            bsz = x.shape[0]
            d = x[0].numel()
            gb, gw = p[GAMMA[0]], p[GAMMA[1]].abs()
            t = torch.remainder(u + torch.arange(bsz, device=x.device) / bsz, 1.0)  # antithetic times
            g = gb + gw * t
            bc = (-1,) + (1,) * (x.ndim - 1)
            z = torch.sqrt(torch.sigmoid(-g)).view(bc) * x + torch.sqrt(torch.sigmoid(g)).view(bc) * eps
            net_p = {k[len(NET):]: v for k, v in p.items() if k.startswith(NET)}
            net_b = {k[len(NET):]: v for k, v in b.items() if k.startswith(NET)}
            with torch.autocast(dev_type, dtype=cast, enabled=cast is not None):
                eps_hat = functional_call(net, (net_p, net_b), (z,),
                                          {"t": (g - mc.gamma_min) / (mc.gamma_max - mc.gamma_min),
                                           "v_conditionings": [c]})
            diffusion = 0.5 * gw * ((eps_hat.float() - eps) ** 2).flatten(1).sum(1)
            var1 = torch.sigmoid(gb + gw)
            latent = 0.5 * (var1 + (1 - var1) * x ** 2 - torch.log(var1) - 1).flatten(1).sum(1)
            err = torch.exp(0.5 * gb) * eps0
            s = mc.data_noise
            recon = (0.5 * (err / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
            loss = (diffusion + latent + recon).mean() / (d * math.log(2.0))
            return loss, loss

        grads = vmap(grad_and_value(member_loss, has_aux=True), randomness="different")
        self.grads = torch.compile(grads) if compile else grads
        leaves = list(self.params.values())
        fused = dev_type == "cuda"
        self.opt = torch.optim.AdamW(leaves, lr=lr, weight_decay=weight_decay, fused=fused, foreach=not fused)

    def step(self, x, c):
        import torch

        u = torch.rand(self.m, device=self.device)
        eps, eps0 = torch.randn_like(x), torch.randn_like(x)
        if self.p_cfg > 0:  # classifier-free guidance dropout: a row's concept vector becomes all -1
            c = torch.where(torch.rand(c.shape[:2], device=c.device)[..., None] < self.p_cfg, -1.0, c)
        g, (_, loss) = self.grads(self.params, self.buffers, x, c, u, eps, eps0)
        sq = sum(v.float().pow(2).reshape(self.m, -1).sum(1) for v in g.values())  # [M] squared global norms
        coef = (self.clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_, per member
        for k, p in self.params.items():
            p.grad = g[k] * coef.view((-1,) + (1,) * (g[k].ndim - 1)).to(g[k].dtype)
        self.opt.step()
        return loss


def build(reference: str, cfg, m: int, device: str | None = None, seed: int = 0):
    """M reference models (GenVDiff around CUNet, sized as ``cfg.model``), seeds seed..seed+M-1."""
    import torch

    from jaxconcept import data as D

    spec = D.spec(cfg.data)
    models = []
    for i in range(m):
        torch.manual_seed(seed + i)
        models.append(R.build_unet(reference, cfg.model, spec.x_shape[0], spec.cond_dim, device))
    return models, spec


def batch(spec, m: int, b: int, device, seed: int = 0):
    """Fixed random images x [M, B, C, H, W] in [0, 1] and concept vectors c [M, B, cond_dim]."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, w, ch = spec.x_shape
    return (torch.rand((m, b, ch, h, w), generator=gen).to(device),
            torch.rand((m, b, spec.cond_dim), generator=gen).to(device))


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(ens: Ensemble, x, c, min_time: float, min_steps: int = 3) -> dict:
    """Model-steps/s of ``ens.step`` on a fixed batch (timed after ``warm``)."""
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < min_time:
        loss = ens.step(x, c)
        n += 1
        if n % 4 == 0:
            _sync(ens.device)
    _sync(ens.device)
    dt = time.perf_counter() - t0
    return {"steps": n, "seconds": dt, "model_steps_per_s": ens.m * n / dt,
            "loss_finite": bool(loss.float().isfinite().all())}


def warm(ens: Ensemble, x, c, steps: int = 3) -> float:
    """Seconds of the first ``steps`` steps (torch.compile compiles in the first)."""
    t = time.perf_counter()
    for _ in range(steps):
        ens.step(x, c)
    _sync(ens.device)
    return time.perf_counter() - t


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="a checkout of the reference (its CUNet and GenVDiff)")
    ap.add_argument("--config", default=None, help="a jaxconcept config file (default: preset 2x2)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config overrides KEY=VALUE")
    ap.add_argument("--tiny", action="store_true", help="preset 'tiny' (16 px, small U-Net): seconds on a CPU")
    ap.add_argument("--members", default="8,32", help="ensemble sizes, in measurement order")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="autocast dtype")
    ap.add_argument("--no-compile", action="store_true", help="eager torch.func (no torch.compile)")
    ap.add_argument("--eager-too", action="store_true", help="also time the first size without torch.compile")
    ap.add_argument("--no-reference-step", action="store_true", help="skip the reference's own one-model step")
    ap.add_argument("--measure-s", type=float, default=3.0, help="timed seconds per measurement")
    ap.add_argument("--wait-go", action="store_true", help="prepare everything, print @ready, wait for a stdin line")
    ap.add_argument("--json", default=None, help="also write every row here")
    a = ap.parse_args(argv)
    try:
        a.members = [int(v) for v in a.members.split(",") if v]
    except ValueError:
        ap.error(f"--members: comma-separated positive integers, got {a.members!r}")
    if not a.members or min(a.members) < 1:
        ap.error("--members: comma-separated positive integers")
    return a


def main(argv=None) -> list[dict]:
    a = parse(argv)
    why = R.available()
    if why:
        print(f"torch_ensemble: {why}", file=sys.stderr)
        sys.exit(2)
    import torch

    from jaxconcept import config as C

    cfg = C.resolve("tiny" if a.tiny and not a.config else None, a.config, a.sets)
    tc = cfg.train
    dev = torch.device(R.device_name())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a PyTorch user would
    head = {"torch": torch.__version__, "device": str(dev),
            "device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "batch_size": tc.batch_size, "dtype": a.dtype, "compile": not a.no_compile}
    emit("start", head)
    rows = []

    def out(row):
        rows.append({**head, **row})
        emit("row", rows[-1])

    t = time.perf_counter()
    models, spec = build(a.reference, cfg, max(a.members), str(dev))
    build_s = time.perf_counter() - t
    x_all, c_all = batch(spec, max(a.members), tc.batch_size, dev)
    work = []  # (row, ensemble, x, c), each warmed up (and compiled) before anything is timed
    if a.eager_too:
        m = a.members[0]
        work.append(({"what": "ensemble", "members": m, "compiled": False}, m, False))
    work += [({"what": "ensemble", "members": m, "compiled": not a.no_compile}, m, not a.no_compile)
             for m in a.members]
    ready = []
    for row, m, comp in work:
        try:
            ens = Ensemble(models[:m], cfg.model, lr=tc.lr, weight_decay=tc.weight_decay, clip=tc.grad_clip,
                           dtype=a.dtype, compile=comp, p_cfg=tc.p_cfg)
            x, c = x_all[:m].contiguous(), c_all[:m].contiguous()
            row["warmup_s"] = warm(ens, x, c)
            row["build_s"] = build_s
            ready.append((row, ens, x, c))
        except Exception as exc:  # noqa: BLE001 - a compile or memory failure is a result: say it, go on
            out({**row, "status": "error", "error": _error(exc)})
    if a.wait_go:
        emit("ready")
        sys.stdin.readline()
    if not a.no_reference_step:  # the reference's own loop: one model, float32, its AdamW and clipping
        try:
            one = R.build_unet(a.reference, cfg.model, spec.x_shape[0], spec.cond_dim, str(dev))
            h, w, ch = spec.x_shape
            r = R.train_rate(one, (ch, h, w), spec.cond_dim, tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay,
                             clip=tc.grad_clip, min_time=a.measure_s)
            out({"what": "reference", "members": 1, "dtype": "float32", "compiled": False, "status": "ok",
                 "model_steps_per_s": r["steps_per_s"], "steps": r["steps"], "seconds": r["seconds"],
                 "n_params": r["n_params"]})
            del one
        except Exception as exc:  # noqa: BLE001
            out({"what": "reference", "members": 1, "status": "error", "error": _error(exc)})
    for row, ens, x, c in ready:
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            r = rate(ens, x, c, a.measure_s)
            if dev.type == "cuda":
                r["peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
            out({**row, "status": "ok", **r})
        except Exception as exc:  # noqa: BLE001
            out({**row, "status": "error", "error": _error(exc)})
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    emit("done")
    return rows


if __name__ == "__main__":
    main()
