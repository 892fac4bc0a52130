"""A deliberately minimal plain-PyTorch federated loop, the yardstick of ``fedlt-bench --mode plain``.

It imports nothing from fedlt: it gets numpy arrays (every client's uint8 training images and labels, in the
split fedlt prepared), the per-round lists of sampled clients, a freshly built model and a few numbers, and
does the same training work as fedlt's FedAvg or FedLoGe clients (same clients, same number of local steps
and samples, same batch size, crop + flip augmentation, SGD settings, sample-weighted averaging) in the most
direct way: one model object, ``load_state_dict`` per client, a Python loop over batches. It does not
reproduce fedlt's numbers bit for bit (its own random draws); it measures what that work costs without a
simulator, so that fedlt's per-client and per-round overhead can be read off as a ratio."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


def _augment(x: torch.Tensor, padding: int, hflip: bool, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    if padding:
        x = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, x.shape[3])
        x = x.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    if hflip:
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def plain_rounds(model: torch.nn.Module, clients: list[tuple[np.ndarray, np.ndarray]], sampled: list[list[int]],
                 method: str, epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float,
                 mean, std, padding: int, hflip: bool, seed: int = 0) -> dict:
    """Train ``len(sampled)`` rounds. ``method``: "fedavg" (CE through ``model``) or "fedloge" (``model`` has
    ``backbone``, ``sse_c`` (frozen), ``global_head``, ``personal_head``: CE(sse_c(h)) steps the backbone, CE on
    detached features steps each head). Returns per-round seconds, samples and steps."""
    g = torch.Generator().manual_seed(seed)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    personal: dict[int, dict] = {}
    round_s, samples, steps = [], [], []
    for clients_of_round in sampled:
        t0 = time.perf_counter()
        states, weights, n_samples, n_steps = [], [], 0, 0
        for cid in clients_of_round:
            x_all = torch.from_numpy(clients[cid][0])
            y_all = torch.from_numpy(clients[cid][1]).long()
            model.load_state_dict(global_state)
            if method == "fedloge" and cid in personal:
                model.personal_head.load_state_dict(personal[cid])
            model.train()
            if method == "fedloge":
                opts = [torch.optim.SGD(model.backbone.parameters(), lr=lr, momentum=momentum,
                                        weight_decay=weight_decay),
                        torch.optim.SGD(model.global_head.parameters(), lr=lr, momentum=momentum),
                        torch.optim.SGD(model.personal_head.parameters(), lr=lr, momentum=momentum)]
            else:
                opts = [torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)]
            n = len(y_all)
            for _ in range(epochs):
                perm = torch.randperm(n, generator=g)
                for s in range(0, n, batch_size):
                    idx = perm[s : s + batch_size]
                    if idx.numel() < 2 and n > 1:
                        continue
                    x = (x_all[idx].permute(0, 3, 1, 2).float().div_(255.0) - mean_t) / std_t
                    x = _augment(x, padding, hflip, g)
                    y = y_all[idx]
                    if method == "fedloge":
                        h = model.backbone(x)
                        loss = F.cross_entropy(model.sse_c(h), y)
                        opts[0].zero_grad(set_to_none=True)
                        loss.backward()
                        opts[0].step()
                        h = h.detach()
                        for head, opt in ((model.global_head, opts[1]), (model.personal_head, opts[2])):
                            opt.zero_grad(set_to_none=True)
                            F.cross_entropy(head(h), y).backward()
                            opt.step()
                    else:
                        opts[0].zero_grad(set_to_none=True)
                        F.cross_entropy(model(x), y).backward()
                        opts[0].step()
                    n_samples += idx.numel()
                    n_steps += 1
            sd = model.state_dict()
            if method == "fedloge":
                personal[cid] = {k: v.clone() for k, v in model.personal_head.state_dict().items()}
            states.append({k: v.detach().clone() for k, v in sd.items()})
            weights.append(n)
        total = float(sum(weights))
        new = {}
        for k, v in global_state.items():
            if method == "fedloge" and k.startswith(("sse_c.", "personal_head.")):
                new[k] = v
            elif v.is_floating_point():
                new[k] = sum(s[k] * (w / total) for s, w in zip(states, weights))
            else:
                new[k] = torch.round(sum(s[k].double() * (w / total) for s, w in zip(states, weights))).to(v.dtype)
        global_state = new
        round_s.append(time.perf_counter() - t0)
        samples.append(n_samples)
        steps.append(n_steps)
    return {"round_s": round_s, "samples": samples, "steps": steps}
