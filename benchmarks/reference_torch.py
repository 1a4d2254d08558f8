"""The reference's PyTorch models, built from a checkout of it, for same-run speed baselines.

The reference (github.com/cfpark00/concept-learning) is never part of this project: it is
imported from the path given (``--reference PATH`` of the benchmarks), with PyTorch installed
separately (``pip install torch``; never a project dependency). Its ``mltools`` package imports
``lightning`` only for a wrapper class that is not used here; a stub stands in when it is missing.

What is built, as the reference's ``utils.get_model`` builds it:
  * images ("images_1", ``model_type: VDiff``): ``CUNet`` (conditioning ``sep_mlp`` on the
    11-dim concept vector) inside ``models.GenVDiff`` with the learned linear schedule;
  * vectors ("vec"): ``CMLP`` (hidden widths, time and concept-vector conditioning) inside
    ``GenVDiff``;
and the optimiser of its configs, ``torch.optim.AdamW(lr, weight_decay)``. One training step is
the reference's ``ml_utils.train`` loop body: ``get_loss``, ``zero_grad``, ``backward``,
``clip_grad_norm_(0.01)``, ``optimizer.step()`` and ``loss.item()`` (which synchronises).
"""
from __future__ import annotations

import os
import sys
import time
import types


def available() -> str | None:
    """None when torch can be imported, else the reason it cannot."""
    try:
        import torch  # noqa: F401 - importable is all that is asked
    except Exception as exc:  # noqa: BLE001 - any import failure means "no baseline"
        return f"torch is not importable ({type(exc).__name__}: {exc})"
    return None


def _stub_lightning():
    import torch

    if "lightning" in sys.modules:
        return
    try:
        import lightning
        return
    except ImportError:
        pass
    lightning = types.ModuleType("lightning")
    pytorch = types.ModuleType("lightning.pytorch")
    pytorch.LightningModule = torch.nn.Module  # only subclassed by a wrapper the benchmarks do not use
    lightning.pytorch = pytorch
    sys.modules["lightning"], sys.modules["lightning.pytorch"] = lightning, pytorch


def _import(reference: str):
    path = os.path.abspath(reference)
    for need in ("models.py", os.path.join("mltools", "networks", "networks.py"),
                 os.path.join("mltools", "models", "vdm_model.py")):
        if not os.path.exists(os.path.join(path, need)):
            raise FileNotFoundError(f"--reference {reference}: no {need} there (expected a checkout of "
                                    "github.com/cfpark00/concept-learning)")
    if path not in sys.path:
        sys.path.insert(0, path)
    _stub_lightning()
    import models
    from mltools.networks import networks
    return networks, models


def device_name(device: str | None = None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def build_unet(reference: str, model_cfg, image_size: int, cond_dim: int, device: str | None = None):
    """The reference's GenVDiff around its CUNet, sized as ``model_cfg`` (a jaxconcept
    ``ModelConfig``; the 2x2 preset is the reference's own model)."""
    networks, models = _import(reference)
    m = model_cfg
    net = networks.CUNet(shape=(3, image_size, image_size), chs=[m.ch * k for k in m.ch_mult],
                         v_conditioning_dims=[cond_dim], v_conditioning_type=m.conditioning,
                         t_conditioning=True, t_embedding_dim=m.time_embed_dim, init_scale=m.init_scale,
                         num_res_blocks=m.num_res_blocks, norm_groups=m.norm_groups, mid_attn=m.mid_attention,
                         n_attention_heads=m.num_heads, dropout_prob=m.dropout)
    beta = {"type": "logsnr", "noise_schedule": "learned_linear", "gamma_min": m.gamma_min, "gamma_max": m.gamma_max}
    model = models.GenVDiff(net=net, beta_settings=beta, data_noise=m.data_noise).to(device_name(device))
    return model


def build_mlp(reference: str, model_cfg, x_dim: int, cond_dim: int, device: str | None = None):
    """The reference's GenVDiff around its CMLP (``utils.get_model`` for the "vec" data set)."""
    networks, models = _import(reference)
    m = model_cfg
    net = networks.CMLP(in_dim=x_dim, h_dims=list(m.hidden), t_conditioning=True,
                        t_embedding_dim=m.time_embed_dim, v_conditioning_dims=[cond_dim])
    beta = {"type": "logsnr", "noise_schedule": "learned_linear", "gamma_min": m.gamma_min, "gamma_max": m.gamma_max}
    return models.GenVDiff(net=net, beta_settings=beta, data_noise=m.data_noise).to(device_name(device))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_rate(model, x_shape, cond_dim: int, batch: int, *, lr: float, weight_decay: float,
               clip: float = 0.01, min_time: float = 2.0, min_steps: int = 3, max_steps: int = 10_000,
               warmup: int = 3, seed: int = 0) -> dict:
    """Training steps per second of the reference loop body on one fixed random batch.

    Returns {"steps_per_s", "steps", "seconds", "device", "n_params", "threads"}.
    """
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)  # the reference's antithetic times use numpy's global generator
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x = torch.rand((batch, *x_shape), device=dev)
    c = torch.rand((batch, cond_dim), device=dev)
    model.train()

    def step():
        loss = model.get_loss(c=c.clone(), x=x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()  # the reference reads the loss every step (a device sync)

    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while n < max_steps and (n < min_steps or time.perf_counter() - t0 < min_time):
        step()
        n += 1
    dt = time.perf_counter() - t0
    return {"steps_per_s": n / dt, "steps": n, "seconds": dt, "device": str(dev), "n_params": n_params(model),
            "threads": torch.get_num_threads()}
