"""DistillationTrainer: plain `transformers.Trainer` with a distillation `compute_loss`.

Everything TrainingArguments gives keeps working (gradient accumulation, checkpoints and resume, report_to,
`accelerate launch` / torchrun with DDP or FSDP) because only the loss changes. The objective is a weighted
sum of registered losses (`distill.losses.LOSSES`), each component logged as `loss/<name>`.

Normalisation: every component is a sum over counted completion tokens divided by `num_items_in_batch`, the
token count of the whole global batch (all gradient-accumulation micro-batches and all processes) that the
Trainer computes from the labels, so the gradient equals one big batch's regardless of how it is split.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback

from distill.losses import CROSS_TOKENIZER_LOSSES, HIDDEN_LOSSES, LOSSES, align_responses
from distill.signals import SparseSignal
from distill.training.onpolicy import SAMPLED_KEY, onpolicy_inputs, sampled_reverse_kl


@dataclass
class LossSpec:
    """One weighted loss component, resolved from config."""

    name: str
    weight: float = 1.0
    temperature: float = 1.0
    params: dict | None = None


class DistillationTrainer(Trainer):
    """Trainer whose loss mixes divergences to a teacher signal (online dense logits or offline top-k).

    teacher: a frozen model for online distillation (kept in eval mode, no grad, in its own dtype), or None
    when batches carry a sparse signal (`topk_ids`, `topk_logprobs`, `topk_tail`) or for labels-only training.
    """

    def __init__(
        self,
        *args,
        teacher: torch.nn.Module | None = None,
        losses: list[LossSpec] | None = None,
        sparse_mode: str = "tail",
        scale_temperature: bool = True,
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        projections: torch.nn.Module | None = None,
        onpolicy=None,
        scorer=None,
        cross_tokenizer=None,
        onpolicy_hook=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            # Device placement follows the student (FSDP/DeepSpeed sharding of the teacher is left to the
            # caller through accelerate; a replicated teacher is the default).
            teacher.to(self.args.device)
        self.loss_specs = losses or [LossSpec("forward_kl")]
        self.sparse_mode = sparse_mode
        self.scale_temperature = scale_temperature
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        self.projections = projections
        # on-policy (distill.training.onpolicy): settings with lmbda/max_new_tokens/temperature/top_p, an API scorer,
        # and a hook that sees every sampled batch; cross-tokenizer (distill.data.crosstok.CrossTokenizer)
        self.onpolicy, self.scorer, self.onpolicy_hook = onpolicy, scorer, onpolicy_hook
        self.cross_tokenizer = cross_tokenizer
        self._onpolicy_rng = random.Random(self.args.seed)
        if projections is not None:
            projections.to(self.args.device)
            self.add_callback(AverageProjectionGrads(projections, self.accelerator))
        self._component_sums: dict[str, list[float]] = defaultdict(list)
        # Our loss is always normalised by the global token count, so let the Trainer count it (over shifted
        # labels) and not divide again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.loss_is_scaled_for_ga = True

    # ----------------------------------------------------------------- optimiser: learned projections too
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.projections is not None and not getattr(self, "_projections_added", False):
            optimizer.add_param_group({"params": list(self.projections.parameters()), "weight_decay": 0.0})
            self._projections_added = True
        return optimizer

    # ----------------------------------------------------------------- the loss
    def _needs(self) -> tuple[bool, bool]:
        names = {s.name for s in self.loss_specs}
        needs_hidden = bool(names & HIDDEN_LOSSES)
        needs_teacher = any(n != "cross_entropy" for n in names)
        return needs_hidden, needs_teacher

    def _teacher_signal(self, inputs: dict, needs_hidden: bool):
        """Dense logits from the live teacher, or the sparse top-k carried by the batch."""
        if "topk_ids" in inputs:
            return SparseSignal(inputs["topk_ids"], inputs["topk_logprobs"], inputs.get("topk_tail")), None
        if self.teacher is None:
            return None, None
        with torch.no_grad():
            out = self.teacher(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                output_hidden_states=needs_hidden,
                use_cache=False,
            )
        return out.logits[:, :-1], (out.hidden_states if needs_hidden else None)

    # ----------------------------------------------------------------- on-policy batches (GKD)
    def training_step(self, model, inputs, num_items_in_batch=None):
        """With probability onpolicy.lmbda, train on the student's own samples of the batch prompts."""
        if (self.onpolicy is not None and self.onpolicy.lmbda > 0
                and self.state.global_step >= getattr(self.onpolicy, "start_step", 0)
                and self._onpolicy_rng.random() < self.onpolicy.lmbda):
            tok = self.processing_class
            eos = self.accelerator.unwrap_model(model).generation_config.eos_token_id
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            eos = sorted(set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
            seed = self.args.seed * 1_000_003 + self.state.global_step * 1009 + self._onpolicy_rng.randrange(1009)
            inputs, num_items_in_batch = onpolicy_inputs(
                self.accelerator.unwrap_model(model), self._prepare_inputs(inputs), self.onpolicy,
                pad_id=tok.pad_token_id, eos_ids=eos, seed=seed, scorer=self.scorer, hook=self.onpolicy_hook,
                scale=self.args.gradient_accumulation_steps * self.accelerator.num_processes,
            )
        return super().training_step(model, inputs, num_items_in_batch)

    def _cross_signal(self, extra: dict, targets: torch.Tensor):
        """Teacher logits on its own tokenization, aligned to the student's response positions."""
        with torch.no_grad():
            out = self.teacher(input_ids=extra["teacher_input_ids"], attention_mask=extra.get("teacher_attention_mask"),
                               use_cache=False)
        return align_responses(out.logits[:, :-1], extra["teacher_labels"][:, 1:], targets)

    @staticmethod
    def _weighted(fn, logits, teacher, mask, kwargs: dict, weights: torch.Tensor | None) -> torch.Tensor:
        """fn with per-example loss weights (batch,): one call per distinct weight, masks split by example."""
        if weights is None or bool((weights == 1).all()):
            return fn(logits, teacher, mask, **kwargs)
        value = logits.new_zeros((), dtype=torch.float32)
        for w in weights.unique().tolist():
            if w != 0:
                rows = (weights == w).to(mask.device)[:, None]
                value = value + w * fn(logits, teacher, mask & rows, **kwargs)
        return value

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        sparse_keys = {k: inputs.pop(k) for k in ("topk_ids", "topk_logprobs", "topk_tail") if k in inputs}
        extra = {k: inputs.pop(k) for k in ("loss_weight", "teacher_input_ids", "teacher_attention_mask",
                                            "teacher_labels", SAMPLED_KEY, "onpolicy") if k in inputs}
        needs_hidden, needs_teacher = self._needs()
        if "teacher_input_ids" in extra:  # cross-tokenizer: the teacher reads its own ids (see _cross_signal)
            needs_teacher = any(s.name not in CROSS_TOKENIZER_LOSSES | {"cross_entropy"} for s in self.loss_specs)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            output_hidden_states=needs_hidden,
            use_cache=False,
        )
        logits = outputs.logits[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        if num_items_in_batch is None:  # evaluation, or a caller outside the Trainer loop
            num_items_in_batch = mask.sum()
        num_items = num_items_in_batch.to(logits.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        if SAMPLED_KEY in extra:  # on-policy batch scored by an API teacher: sampled reverse KL only
            value = sampled_reverse_kl(logits, targets, extra[SAMPLED_KEY], mask, num_items_in_batch=num_items)
            if model.training:
                self._component_sums["sampled_reverse_kl"].append(float(value.detach()))
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                value = value * self.accelerator.num_processes  # as below: DDP averages over processes
            return (value, outputs) if return_outputs else value
        onpolicy_batch = "onpolicy" in extra
        cross = None
        if "teacher_input_ids" in extra and self.teacher is not None:
            cross = self._cross_signal(extra, targets)

        signal, teacher_hidden = (None, None)
        if needs_teacher:
            signal, teacher_hidden = self._teacher_signal({**inputs, **sparse_keys}, needs_hidden)
            if signal is None:
                raise ValueError(
                    "train.losses asks for a teacher divergence but there is no teacher signal: use "
                    "train.signal=online (a local teacher) or offline (a store with top-k), or only cross_entropy"
                )

        total = logits.new_zeros((), dtype=torch.float32)
        for spec in self.loss_specs:
            if onpolicy_batch and spec.name == "cross_entropy":
                continue  # the labels of a sampled batch are the student's own tokens
            fn = LOSSES[spec.name]
            params = dict(spec.params or {})
            if spec.name in CROSS_TOKENIZER_LOSSES and cross is not None:
                kwargs = dict(temperature=spec.temperature, num_items_in_batch=num_items,
                              scale_temperature=self.scale_temperature, chunk_size=self.chunk_size,
                              vocab_size=self.vocab_size, teacher_vocab_size=self.cross_tokenizer.teacher_vocab_size,
                              **params)
                if spec.name == "uld_hybrid":
                    kwargs["matched"] = self.cross_tokenizer.matched
                value = self._weighted(fn, logits, cross[0], mask & cross[1], kwargs, extra.get("loss_weight"))
            elif spec.name in HIDDEN_LOSSES:
                if teacher_hidden is None:
                    raise ValueError(f"{spec.name} needs an online teacher (train.signal=online)")
                value = fn(
                    outputs.hidden_states, teacher_hidden, attention_mask_for_hidden(inputs, labels),
                    projections=self.projections, num_items_in_batch=num_items, **params,
                )
            else:
                teacher = targets if spec.name == "cross_entropy" else signal
                kwargs = dict(temperature=spec.temperature, num_items_in_batch=num_items, **params)
                if spec.name != "cross_entropy":
                    kwargs.update(scale_temperature=self.scale_temperature, sparse_mode=self.sparse_mode)
                    if self.vocab_size is not None:
                        kwargs.setdefault("vocab_size", self.vocab_size)
                if self.chunk_size is not None:
                    kwargs["chunk_size"] = self.chunk_size
                value = self._weighted(fn, logits, teacher, mask, kwargs, extra.get("loss_weight"))
            total = total + spec.weight * value
            if model.training:
                # Logged per micro-batch as the share of the global batch; summed back in `log`.
                self._component_sums[spec.name].append(float(value.detach()))

        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1 and num_items_in_batch is not None:
            # DDP averages gradients over processes; our loss is already divided by the global count.
            total = total * self.accelerator.num_processes
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the mean per-step value of each loss component to the Trainer's log line."""
        if "loss" in logs and self._component_sums:
            steps = max(1, self.args.gradient_accumulation_steps)
            names = list(self._component_sums)
            sums = torch.tensor([sum(self._component_sums[n]) for n in names], device=self.args.device)
            if self.accelerator.num_processes > 1:
                # each rank holds its shares of the global batch: add them up (log runs on every rank)
                sums = self.accelerator.reduce(sums, reduction="sum")
            for name, total in zip(names, sums.tolist()):
                # each optimiser step contributes `steps` micro-batch shares that add up to the step's value
                logs[f"loss/{name}"] = round(total / max(1, len(self._component_sums[name]) / steps), 6)
            self._component_sums.clear()
        super().log(logs, *args, **kwargs)


class AverageProjectionGrads(TrainerCallback):
    """The learned hidden-state projections live outside the DDP/FSDP-wrapped student, so nothing syncs their
    gradients: average them over processes before each optimizer step, as DDP does for the student's."""

    def __init__(self, projections: torch.nn.Module, accelerator):
        self.projections, self.accelerator = projections, accelerator

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.accelerator.num_processes > 1:
            for param in self.projections.parameters():
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")


def attention_mask_for_hidden(inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Hidden states are compared on completion tokens (unshifted positions with a label)."""
    return labels != -100
