"""A tiny MoE language model trained beside its float64 reference, step by step: the loop of
tests/test_training.py (gloo, backend torch) and tests/gpu/check_training.py (GPUs, both backends).

The model: token embedding -> h + MoELayer(h) -> linear head, cross-entropy against a fixed
random token -> token map. Each rank trains on its own batches; the loss is the mean over ranks,
so, as MoELayer documents, expert gradients arrive summed over ranks and the replicated
parameters' gradients (embedding, head, router) are summed over ranks here, as data parallelism
would. The reference is the same model in float64 in one process, its MoE reference_forward on
each rank's batch (capacity, if any, per rank)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flashmoe_py import MoEConfig, MoELayer, reference_forward
from flashmoe_py.reference import reference_routing

VOCAB, BATCH = 64, 32


class TinyMoEModel(nn.Module):
    """tokens [batch] int64 -> logits [batch, VOCAB]."""

    def __init__(self, moe: MoELayer, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, moe.config.hidden_size)
        self.head = nn.Linear(moe.config.hidden_size, VOCAB, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=g))
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) / moe.config.hidden_size ** 0.5)
        self.moe = moe

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.moe(h))

    def replicated(self) -> list[nn.Parameter]:
        return [self.embed.weight, self.head.weight, self.moe.router_weight]


def model_params(model: TinyMoEModel) -> list[nn.Parameter]:
    """The model's parameters in ReferenceModel.params' order: embed, head, router, w_in, w_out."""
    return [model.embed.weight, model.head.weight, model.moe.router_weight, model.moe.w_in, model.moe.w_out]


@torch.no_grad()
def full_tensors(model: TinyMoEModel, per_param: dict) -> list[torch.Tensor]:
    """The model's parameters, or per_param's tensors where given (a parameter's optimizer state,
    in its layout), in ReferenceModel.params' order and the full layer's layout: the layer's own
    full_weight_dict (gathered and converted) run with those tensors in its parameters' place
    (collective at world > 1)."""
    params = model_params(model)
    held = [p.data for p in params]
    try:
        for p in params:
            p.data = per_param.get(p, p.data)
        full = model.moe.full_weight_dict()
        return [params[0].data.clone(), params[1].data.clone(), full["router_weight"], full["w_in"], full["w_out"]]
    finally:
        for p, data in zip(params, held):
            p.data = data


class ReferenceModel:
    """The same model in float64, the MoE through reference_forward, every rank's batch at once."""

    def __init__(self, model: TinyMoEModel):
        self.params = [t.double().requires_grad_() for t in full_tensors(model, {})]
        self.config = model.moe.config

    @torch.no_grad()
    def take(self, model: TinyMoEModel, opt: torch.optim.Optimizer, ref_opt: torch.optim.Optimizer) -> None:
        """Become the model's float64 copy again, weights and ref_opt's state from opt's (collective
        at world > 1): after a step at which the two routed a token differently, so that every
        later step compares the two from one state."""
        for p, t in zip(self.params, full_tensors(model, {})):
            p.copy_(t)
        layer_params = model_params(model)
        for key, value in opt.state[layer_params[0]].items():
            if not torch.is_tensor(value) or value.dim() == 0:  # Adam's step count
                for p in self.params:
                    ref_opt.state[p][key] = value.clone() if torch.is_tensor(value) else value
                continue
            full = full_tensors(model, {p: opt.state[p][key] for p in layer_params})
            for p, t in zip(self.params, full):
                ref_opt.state[p][key] = t.double()

    def loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        embed, head, router, w_in, w_out = self.params
        losses = []
        for tokens, targets in batches:
            h = embed[tokens]
            logits = (h + reference_forward(h, router, w_in, w_out, self.config, torch.float64)) @ head.t()
            losses.append(F.cross_entropy(logits, targets))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def expert_counts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[num_experts] int64 token-slots the reference routes to each expert for `tokens`."""
        _, experts, _ = reference_routing(self.params[0][tokens], self.params[2], self.config, torch.float64)
        return torch.bincount(experts.reshape(-1), minlength=self.config.num_experts)


def batch(seed: int, step: int, rank: int, target_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH tokens [BATCH] int64 and their targets: target_map[token], or a random token a
    quarter of the time, so the loss stays well above 0."""
    g = torch.Generator().manual_seed(seed + 7919 * step + rank)
    tokens = torch.randint(VOCAB, (BATCH,), generator=g)
    noise = torch.rand(BATCH, generator=g) < 0.25
    return tokens, torch.where(noise, torch.randint(VOCAB, (BATCH,), generator=g), target_map[tokens])


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    return {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
            "adam": lambda: torch.optim.Adam(params, lr=3e-3, eps=1e-6)}[name]()


def sum_replicated_grads(model: TinyMoEModel, scalars: torch.Tensor, world: int) -> torch.Tensor:
    """Sum the replicated parameters' gradients over ranks in place, and `scalars` [n] fp32 with
    them (one all-reduce) -> the summed scalars."""
    grads = [p.grad for p in model.replicated()]
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads] + [scalars])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads] + [scalars.numel()])):
            g.copy_(part.view_as(g))
        scalars = flat[-scalars.numel():]
    return scalars


def train_both(rank, world, cfg: dict, seed, optimizer: str, steps: int, backward) -> tuple[list, list, list]:
    """train_model for a new MoELayer(cfg) with `backward` (backend torch, where torch puts tensors)."""
    moe = MoELayer(MoEConfig.from_dict(cfg), seed=seed, backward=backward)
    return train_model(TinyMoEModel(moe, seed), rank, world, seed, optimizer, steps)


def train_model(model: TinyMoEModel, rank, world, seed, optimizer: str, steps: int) -> tuple[list, list, list]:
    """`steps` optimizer steps of the model and of its float64 reference on the same batches ->
    (layer losses, reference losses, routing differs), at each step: the mean loss over ranks, and
    whether the layer routed any rank's batch to other experts than the reference did (per-expert
    counts compared; after such a step the reference takes the model's state). The model is moved
    to its MoELayer's device first; the reference runs there too."""
    device = model.moe.device
    model.to(device)
    ref = ReferenceModel(model)
    opt, ref_opt = make_optimizer(optimizer, model.parameters()), make_optimizer(optimizer, ref.params)
    target_map = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))
    losses, ref_losses, routing_differs = [], [], []
    for step in range(steps):
        batches = [tuple(t.to(device) for t in batch(seed, step, r, target_map)) for r in range(world)]
        opt.zero_grad()
        tokens, targets = batches[rank]
        loss = F.cross_entropy(model(tokens), targets) / world
        loss.backward()
        differs = not torch.equal(model.moe.last_stats.expert_counts.cpu(), ref.expert_counts(tokens).cpu())
        scalars = torch.tensor([float(loss.detach()), float(differs)], device=device)
        summed = sum_replicated_grads(model, scalars, world).tolist()
        losses.append(summed[0])
        routing_differs.append(summed[1] > 0)
        opt.step()
        ref_opt.zero_grad()
        ref_loss = ref.loss(batches)
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(float(ref_loss.detach()))
        if routing_differs[-1]:  # different gradients this step: on from the layer's state
            ref.take(model, opt, ref_opt)
    return losses, ref_losses, routing_differs
