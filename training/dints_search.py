"""DiNTS architecture search (phase one of the builtin ``dints`` recipe).

Written from the facts of the official template (``dints/scripts/search.py`` @21ed8e5), not
its code: MONAI's ``TopologySearch`` space (``search_channel_mul`` 0.5) inside ``DiNTS``; the
training cases split in two halves, one for the network weights, one for the architecture;
SGD (lr ``search_learning_rate`` 0.025, momentum 0.9, weight decay 4e-5, step decay x0.5 at
40 % of the post-warm-up epochs) on the weights; Adam (lr 1e-3, betas 0.5/0.999) on the path
and cell logits ``log_alpha_a`` / ``log_alpha_c``; the first ``search_warmup_fraction``
(0.5) of the epochs train the weights only; afterwards every weight step is followed by one
architecture step on a batch of the other half, whose loss is the segmentation loss plus,
ramped up linearly, the path and cell entropies, the memory-budget term
``|ram_cost_factor - usage / full|`` (0.8) and 0.001 x the topology entropy. Gradients are
clipped at 0.5. At the end ``TopologySearch.decode()`` gives the architecture
(``code_a``, ``code_c``, ``node_a``) that the training network is built from.

The official template ships a pre-searched ``arch_code.pth`` and searches only when asked
(1000 epochs, 500 warm-up); here the search runs for ``search_epochs`` (default a quarter of
``num_epochs``) before training, on the same patches, loss and unknown masking as training.
A stop signal during the search exits for requeue; the requeued job searches again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RequeueRequested
from .networks import DINTS_DEFAULTS

log = logging.getLogger("cellmap.dints_search")


def _halves(items: list[dict[str, str]], seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    if len(items) < 2:
        return items, items
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    half = len(items) // 2
    return shuffled[:half], shuffled[half:]


def search_dints(
    cfg: dict[str, Any],
    train_items: list[dict[str, str]],
    loss_fn: torch.nn.Module,
    dev: torch.device,
    stop: Callable[[], bool],
    make_dataset: Callable[[list[dict[str, str]]], Any],
    epoch_batches: Callable[[Any, int], Iterator[dict[str, Any]]],
) -> dict[str, Any]:
    """Search a DiNTS topology on ``train_items``; returns ``{"arch_code": {...}, "history": [...]}``.

    Raises:
        RequeueRequested: a stop signal arrived (nothing is saved; the search reruns).
    """
    from monai.networks.nets import DiNTS, TopologySearch

    net = {**DINTS_DEFAULTS, **(cfg.get("network") or {})}
    n_epochs = cfg.get("search_epochs")
    n_epochs = max(1, int(cfg["num_epochs"]) // 4) if n_epochs is None else int(n_epochs)
    warmup = int(math.floor(float(cfg.get("search_warmup_fraction", 0.5)) * n_epochs))
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    space = TopologySearch(
        channel_mul=float(net["search_channel_mul"]),
        num_blocks=int(net["num_blocks"]),
        num_depths=int(net["num_depths"]),
        use_downsample=True,
        device=str(dev),
    )
    model = DiNTS(dints_space=space, in_channels=1, num_classes=int(cfg["output_classes"]), use_downsample=True).to(dev)
    weights = [p for n, p in model.named_parameters() if "log_alpha" not in n]
    opt_w = torch.optim.SGD(weights, lr=float(cfg.get("search_learning_rate", 0.025)), momentum=0.9, weight_decay=4e-5)
    opt_a = torch.optim.Adam(
        [space.log_alpha_a], lr=float(cfg.get("search_learning_rate_arch", 1e-3)), betas=(0.5, 0.999)
    )
    opt_c = torch.optim.Adam(
        [space.log_alpha_c], lr=float(cfg.get("search_learning_rate_arch", 1e-3)), betas=(0.5, 0.999)
    )
    sched = torch.optim.lr_scheduler.StepLR(opt_w, step_size=max(1, int((n_epochs - warmup) * 0.4)), gamma=0.5)
    ram_factor = float(cfg.get("search_ram_cost_factor", 0.8))
    items_w, items_a = _halves(train_items, seed)
    ds_w, ds_a = make_dataset(items_w), make_dataset(items_a)
    history: list[dict[str, Any]] = []
    a_iter: Iterator[dict[str, Any]] | None = None
    a_pass = 0
    model.train()
    t_all = time.perf_counter()
    for epoch in range(n_epochs):
        torch.manual_seed(seed + 7919 + epoch)
        loss_w, loss_a, steps = 0.0, 0.0, 0
        for batch in epoch_batches(ds_w, 10_000 + epoch):
            img, lab = batch["image"].to(dev), batch["label"].to(dev)
            space.log_alpha_a.requires_grad_(False)
            space.log_alpha_c.requires_grad_(False)
            opt_w.zero_grad(set_to_none=True)
            loss = loss_fn(model(img), lab)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, 0.5)
            opt_w.step()
            loss_w += float(loss.detach())
            steps += 1
            if epoch >= warmup:
                try:
                    sample = next(a_iter) if a_iter is not None else None
                except StopIteration:
                    sample = None
                if sample is None:
                    a_iter = iter(epoch_batches(ds_a, 20_000 + a_pass))
                    a_pass += 1
                    sample = next(a_iter)
                img_a, lab_a = sample["image"].to(dev), sample["label"].to(dev)
                for p in weights:
                    p.requires_grad_(False)
                space.log_alpha_a.requires_grad_(True)
                space.log_alpha_c.requires_grad_(True)
                probs_a, _ = space.get_prob_a(child=True)
                ent_a = -(probs_a * torch.log(probs_a + 1e-5)).mean()
                ent_c = -(F.softmax(space.log_alpha_c, dim=-1) * F.log_softmax(space.log_alpha_c, dim=-1)).mean()
                topo = space.get_topology_entropy(probs_a)
                ram_full = space.get_ram_cost_usage(img.shape, full=True)
                ram_used = space.get_ram_cost_usage(img.shape)
                ram_loss = torch.abs(ram_factor - ram_used / ram_full)
                ramp = (epoch - warmup) / max(1, n_epochs - warmup)
                opt_a.zero_grad(set_to_none=True)
                opt_c.zero_grad(set_to_none=True)
                loss = loss_fn(model(img_a), lab_a) + ramp * (ent_a + ent_c + ram_loss + 0.001 * topo)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([space.log_alpha_a], 0.5)
                torch.nn.utils.clip_grad_norm_([space.log_alpha_c], 0.5)
                opt_a.step()
                opt_c.step()
                for p in weights:
                    p.requires_grad_(True)
                loss_a += float(loss.detach())
            if stop():
                raise RequeueRequested(f"signal during the DiNTS search (epoch {epoch}); the search reruns")
        if epoch >= warmup:
            sched.step()
        row = {
            "epoch": epoch,
            "weight_loss": round(loss_w / max(1, steps), 5),
            "arch_loss": round(loss_a / max(1, steps), 5) if epoch >= warmup else None,
        }
        history.append(row)
        log.info(
            "dints search epoch %d/%d weight loss %.4f arch loss %s",
            epoch + 1,
            n_epochs,
            row["weight_loss"],
            row["arch_loss"],
        )
    node_a, code_a, code_c, code_a_max = space.decode()
    code = {
        "code_a": np.asarray(code_a).astype(int).tolist(),
        "code_c": np.asarray(code_c).astype(int).tolist(),
        "node_a": np.asarray(node_a).astype(int).tolist(),
        "code_a_max": np.asarray(code_a_max).astype(int).tolist(),
    }
    n_paths = int(np.asarray(code_a).sum())
    log.info(
        "dints search: %d epochs (%d warm-up) in %.0f s; %d of %d paths active",
        n_epochs,
        warmup,
        time.perf_counter() - t_all,
        n_paths,
        np.asarray(code_a).size,
    )
    return {
        "arch_code": code,
        "search_epochs": n_epochs,
        "warmup_epochs": warmup,
        "search_channel_mul": float(net["search_channel_mul"]),
        "history": history,
    }
