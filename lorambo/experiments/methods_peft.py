"""peft's AdaLoRA and EVA, run through peft itself, with their budgets counted in parameters.

Both count their budget in *ranks*; a rank of an attention projection (384 x 384) costs 768
parameters here and one of a feed-forward layer (384 x 1536) 1,920. To hold them to the same P as
every other method, the budget is converted, and peft's own ranking decides what is kept:

- **AdaLoRA** (``AdaLoraConfig``: ``target_r`` = the level rounded up, ``init_r`` =
  ceil(growth_factor x level) but at least ``target_r`` + 1 (something to prune), ``tinit``/``tfinal``
  a fifth of the steps each, ``deltaT`` = 1, ``total_step`` = steps, ``lora_alpha`` = ``init_r`` so
  the scaling is 1 as in lorambo). peft's cubic schedule goes from ``init_bgt`` to ``target_bgt``
  ranks; the schedule is mapped linearly onto parameters (``init_r * sum(d+k)`` down to P) and at
  every masking step peft's ``mask_to_budget`` keeps the largest number of its top-scored triplets
  (peft's own scores) whose cost fits the scheduled parameter budget. The final pattern is within P.
  peft adds AdaLoRA's orthogonality penalty only when the model's output has a ``loss``; this
  model returns hidden states, so the same penalty (peft's formula, weight ``orth_reg_weight``) is
  added here.
- **EVA** (``LoraConfig(init_lora_weights="eva")``, ``EvaConfig(rho=growth_factor)``, ``r`` = the
  budget level rounded up, as AdaLoRA's ``target_r``): peft's ``get_eva_state_dict`` computes the
  SVD of every layer's inputs on fixed training rows (``eva_batches`` x 32) and redistributes
  ``r * 36`` ranks by explained variance (computed once per task and budget: it depends on the
  data only, not on the seed or the learning rate). If that redistribution costs more than P, it
  is refitted greedily by each component's share of its layer's input variance (over the tokens
  peft's SVD sees: padding left out), a layer's components in order, while they fit; then
  ``initialize_lora_eva_weights`` loads it.
"""

from __future__ import annotations

import heapq
import math
import warnings

import torch

from lorambo.experiments.methods import Method, ceil_level, schedule, spent
from lorambo.experiments.student import short


def _module_of(param_name: str) -> str:
    """``...layer.0.attention.self.query.%s.default`` / ``...query.lora_E.default`` -> short name."""
    for marker in (".%s.", ".lora_E.", ".lora_A.", ".lora_B."):
        if marker in param_name:
            return short(param_name.split(marker)[0])
    raise ValueError(f"_module_of: {param_name!r} is not an AdaLoRA parameter name (none of .%s., .lora_E., "
                     ".lora_A., .lora_B. in it)")


class AdaLoRA(Method):
    name = "adalora"

    def setup(self, student):
        from peft import AdaLoraConfig, get_peft_model

        ctx, s = self.ctx, schedule(self.ctx.cfg.steps)
        target_r = ceil_level(ctx.level)
        self.init_r = max(target_r + 1, math.ceil(ctx.cfg.growth_factor * ctx.level))
        self.config = AdaLoraConfig(target_modules=list(ctx.task.names), init_r=self.init_r, target_r=target_r,
                                    tinit=s["tinit"], tfinal=s["tfinal"], deltaT=1, total_step=ctx.cfg.steps,
                                    lora_alpha=self.init_r, lora_dropout=0.0)
        self.model = get_peft_model(student, self.config)
        self.allocator = self.model.base_model.rankallocator
        self._wrap_budget()
        return self.model

    # ---------------------------------------------------------------- budget in parameters
    def _wrap_budget(self):
        alloc, costs = self.allocator, self.ctx.costs
        init_bgt, target_bgt = alloc.init_bgt, alloc.target_bgt
        init_params = self.init_r * sum(costs.values())
        original = alloc.mask_to_budget

        def param_budget(rank_budget: int) -> float:
            frac = (rank_budget - init_bgt) / (target_bgt - init_bgt)      # 0 at init, 1 at target
            return init_params + frac * (self.ctx.budget - init_params)

        def mask_to_budget(model, budget):
            scores = self._triplet_scores(model)                               # [(score, cost)]
            order = sorted(scores, key=lambda sc: -sc[0])
            keep, used, limit = 0, 0, param_budget(budget)
            for _, cost in order:
                if used + cost > limit:
                    break
                used, keep = used + cost, keep + 1
            if keep >= init_bgt:  # everything fits: peft's kthvalue needs k >= 1, so mask nothing
                return {n: [True] * p.shape[0] for n, p in model.named_parameters() if ".lora_E." in n}
            return original(model, keep)

        alloc.mask_to_budget = mask_to_budget

    def _triplet_scores(self, model) -> list[tuple[float, int]]:
        """peft's triplet importance (``RankAllocator.mask_to_budget``, same formula) with costs."""
        alloc, name = self.allocator, self.allocator.adapter_name
        value, vector = {}, {}
        for n, _ in model.named_parameters():
            if f"lora_A.{name}" in n:
                vector.setdefault(n.replace("lora_A", "%s"), []).append(
                    torch.mean(alloc._element_score(n), dim=1, keepdim=True))
            elif f"lora_B.{name}" in n:
                vector.setdefault(n.replace("lora_B", "%s"), []).append(
                    torch.mean(alloc._element_score(n), dim=0, keepdim=False).view(-1, 1))
            elif f"lora_E.{name}" in n:
                value[n.replace("lora_E", "%s")] = alloc._element_score(n)
        out = []
        for key, parts in vector.items():
            total = alloc._combine_ipt(value[key], torch.cat(parts, dim=1))
            cost = self.ctx.costs[_module_of(key)]
            out += [(float(v), cost) for v in total.view(-1)]
        return out

    # ------------------------------------------------------------------------ training hooks
    def extra_loss(self, model):
        weight = self.config.orth_reg_weight
        terms = []
        for n, p in model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and p.requires_grad:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                terms.append(torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), p="fro"))
        return weight * torch.stack(terms).mean() if terms else None

    def after_step(self, step):
        self.model.base_model.update_and_allocate(step)

    def final_ranks(self) -> dict[str, int]:
        pattern = self.model.peft_config["default"].rank_pattern
        if not pattern:
            raise RuntimeError("AdaLoRA never reached its final allocation step")
        ranks = {short(n): 0 for n in self.ctx.task.names}
        for key, mask in pattern.items():
            ranks[_module_of(key)] = int(sum(bool(m) for m in mask))
        return ranks

    def trainable_lora_params(self) -> int:
        total = 0
        for n, p in self.model.named_parameters():
            if ".lora_E." in n:
                total += int((p != 0).sum()) * self.ctx.costs[_module_of(n)]
        return total


class EVA(Method):
    name = "eva"

    def setup(self, student):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.config import EvaConfig
        from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights

        ctx = self.ctx
        r = ceil_level(ctx.level)  # r * layers ranks cover the level; the fit trims what P cannot buy
        config = LoraConfig(target_modules=list(ctx.task.names), r=r, lora_alpha=r, lora_dropout=0.0,
                            init_lora_weights="eva",
                            eva_config=EvaConfig(rho=ctx.cfg.growth_factor, use_label_mask=False))
        with warnings.catch_warnings():  # "use low_cpu_mem_usage=True": a memory tip, not a problem here
            warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
            self.model = get_peft_model(student, config)
        key = ("eva", ctx.level)  # data only: the same for every seed and learning rate
        if key not in ctx.cache:
            data = ctx.task.eva_batches(ctx.cfg.eva_batches)
            passes = [0]

            def forward(model, batch):  # peft loops until every component converges: bound it
                passes[0] += 1
                if passes[0] > ctx.cfg.eva_max_passes:
                    raise RuntimeError(f"EVA: peft's incremental SVD did not converge in {ctx.cfg.eva_max_passes} "
                                       f"passes over {len(data)} batches; raise eva_batches")
                return model(batch)

            state = get_eva_state_dict(self.model, data, forward_fn=forward, show_progress_bar=False)
            raw = {short(n): int(u.shape[0]) for n, u in state.items()}
            ctx.cache[key] = self._fit_budget(state, raw)
        state = {n: u.clone() for n, u in ctx.cache[key].items()}
        self.ranks = {short(n): 0 for n in ctx.task.names}
        self.ranks.update({short(n): int(u.shape[0]) for n, u in state.items()})
        initialize_lora_eva_weights(self.model, eva_state_dict=state, show_progress_bar=False)  # pops state
        return self.model

    def _fit_budget(self, state, raw):
        dims = self.ctx.task.dims
        if spent(raw, dims) <= self.ctx.budget:
            return state
        shares = self._variance_shares(state)                  # {key: [share of component j]}
        # greedy by share over each layer's next component: a layer's components are kept in
        # order, so its component j + 1 competes (at its own share) once j is kept; one that does
        # not fit ends its layer, not the fit (a cheaper layer's component may still fit)
        keep, used = {key: 0 for key in state}, 0
        heap = [(-sh[0], key) for key, sh in shares.items() if sh]
        heapq.heapify(heap)
        while heap:
            _, key = heapq.heappop(heap)
            cost = sum(dims[short(key)])
            if used + cost > self.ctx.budget:
                continue
            keep[key], used = keep[key] + 1, used + cost
            if keep[key] < len(shares[key]):
                heapq.heappush(heap, (-shares[key][keep[key]], key))
        return {key: u[:keep[key]] for key, u in state.items()}

    @torch.no_grad()
    def _variance_shares(self, state) -> dict[str, list[float]]:
        """Share of each layer's (centred) input variance along each EVA component, over the
        tokens peft's SVD sees: the batch's ``attention_mask`` leaves padding out."""
        sums, handles, mask_of = {}, [], {}
        for key in state:
            module = self.model.get_submodule(key)

            def hook(mod, args, out, key=key):
                x = args[0]
                mask = mask_of.get("batch")
                x = (x[mask.bool()] if mask is not None and mask.shape == x.shape[:-1]
                     else x.reshape(-1, x.shape[-1])).double()
                s = sums.setdefault(key, [0, 0.0, 0.0])
                s[0] += x.shape[0]
                s[1] = s[1] + x.sum(0)
                s[2] = s[2] + x.T @ x
            handles.append(module.register_forward_hook(hook))
        try:
            with self.model.disable_adapter():
                for batch in self.ctx.task.eva_batches(self.ctx.cfg.eva_batches):
                    mask_of["batch"] = batch.get("attention_mask")
                    self.model(batch)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for key, u in state.items():
            n, s1, s2 = sums[key]
            mean = s1 / n
            cov = s2 / n - torch.outer(mean, mean)
            total = float(torch.trace(cov))
            comps = u.double()
            out[key] = [float(c @ cov @ c) / total for c in comps]
        return out

    def final_ranks(self) -> dict[str, int]:
        return dict(self.ranks)

    def trainable_lora_params(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters()
                   if (".lora_A." in n or ".lora_B." in n) and p.requires_grad)

