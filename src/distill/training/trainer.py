"""DistillationTrainer: plain `transformers.Trainer` with a distillation `compute_loss`.

Everything TrainingArguments gives keeps working (gradient accumulation, checkpoints and resume, report_to,
`accelerate launch` / torchrun with DDP or FSDP) because only the loss changes. The objective is a weighted
sum of registered losses (`distill.losses.LOSSES`), each component logged as `loss_<name>`; compute_loss asks
each loss's registry entry what it needs (logits or hidden states, labels, teacher signal or the teacher's own
tokenization) instead of comparing names.

Normalisation: every component is a sum over counted completion tokens divided by `num_items_in_batch`, the
token count of the whole global batch (all gradient-accumulation micro-batches and all processes) that the
Trainer computes from the labels, so the gradient equals one big batch's regardless of how it is split.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback

from distill.losses import LOSSES, LinearLogits, align_responses, place_counted
from distill.losses.common import shared_projection, shared_scale
from distill.losses.fused import DEFAULT_CHUNK_SIZE, forward_unprojected, output_head
from distill.modeling import eos_token_ids
from distill.signals import SparseSignal
from distill.training.checkpoints import check_finite_loss, finite_weights_guard
from distill.training.onpolicy import SAMPLED_KEY, micro_batch_rng, onpolicy_inputs, sampled_reverse_kl

# Batch keys that are not model inputs: per-example loss weights (chain of thought), the teacher's own
# tokenization (cross-tokenizer), on-policy markers. The sparse top-k keys stay in `inputs` for _teacher_signal.
# Component metrics are `loss_<name>`: never `loss/<name>`, which a tracker that maps names to paths (MLflow's file
# store) cannot hold next to the `loss` metric itself ("[Errno 20] Not a directory").
COMPONENT_PREFIX = "loss_"
EXTRA_KEYS = ("loss_weight", "teacher_input_ids", "teacher_attention_mask", "teacher_labels", "teacher_index",
              "teacher_exact", SAMPLED_KEY, "onpolicy")


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
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        fused: bool = True,
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
        # The fused linear path (distill.losses.fused): the models' forwards skip lm_head and the loss projects only
        # the counted tokens, chunk by chunk when chunk_size is set. Not under FSDP / DeepSpeed (sharded lm_head).
        self.fused = fused and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        self.vocab_size = vocab_size
        self.projections = projections
        # on-policy (distill.training.onpolicy): settings with lmbda/max_new_tokens/temperature/top_p, an API scorer,
        # and a hook that sees every sampled batch; cross-tokenizer (distill.data.crosstok.CrossTokenizer)
        self.onpolicy, self.scorer, self.onpolicy_hook = onpolicy, scorer, onpolicy_hook
        self.cross_tokenizer = cross_tokenizer
        self._micro_batch = (-1, -1)  # (optimizer step, micro-batch within it): where the on-policy draw comes from
        if projections is not None:
            projections.to(self.args.device)
            if self.is_deepspeed_enabled:  # the engine clips the student alone; elsewhere see _joint_grad_norm
                self.add_callback(AverageProjectionGrads(projections, self.accelerator))
            self.add_callback(SaveProjections(projections))
        self._component_sums: dict[str, list[float]] = defaultdict(list)
        self.add_callback(finite_weights_guard())  # never a checkpoint or student with NaN / inf weights
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

    # ----------------------------------------------------------------- clipping: learned projections too
    def _clip_grad_norm(self, model):
        """train.args max_grad_norm over the student and the learned projections together: the Trainer clips only
        the model's parameters, so a huge hidden-state loss would move the projections unclipped."""
        if self.projections is None or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self._joint_grad_norm(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The logged grad_norm; with projections and clipping off (max_grad_norm=0), theirs counted as well."""
        if grad_norm is None and self.projections is not None and not self.is_deepspeed_enabled:
            grad_norm = self._joint_grad_norm(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _joint_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """The global gradient norm of student + projections, every gradient scaled by max_norm / norm when over.

        The projections live outside the DDP-wrapped student, so their gradients are averaged over processes
        here first (as DDP does for the student's): every process then computes the same norm and clips alike."""
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        average_grads(self.projections, self.accelerator)
        student_norm = super()._get_grad_norm(model)  # unscaled (fp16) and reduced over shards; clips nothing
        grads = [p.grad for p in self.projections.parameters() if p.grad is not None]
        norms = [torch.as_tensor(student_norm, dtype=torch.float32, device=self.args.device)]
        norms += [get_total_norm(grads).float().to(self.args.device)] if grads else []
        total = torch.linalg.vector_norm(torch.stack(norms))
        if max_norm != float("inf"):
            clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, total)
            clip_grads_with_norm_([p for p in self.projections.parameters() if p.grad is not None], max_norm, total)
        return total

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train, restoring the learned projections of the checkpoint it resumes from first: the
        Trainer restores their optimizer state (they are a param group), so they must not start afresh."""
        if self.projections is not None and resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint:
                load_projections(self.projections, checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ----------------------------------------------------------------- the loss
    def _forward(self, model, input_ids, attention_mask, needs_hidden: bool, fused: bool):
        """(outputs, causally shifted student or teacher logits): plain logits, or with `fused` a LinearLogits
        (final hidden states + lm_head, projected chunk by chunk inside the loss: distill.losses.fused)."""
        inner = self.accelerator.unwrap_model(model) if model is not self.teacher else model
        head = output_head(inner) if fused else None
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": needs_hidden,
                  "use_cache": False}
        if head is None:
            outputs = model(**kwargs)
            return outputs, outputs.logits[:, :-1]
        outputs, logits = forward_unprojected(model, head, **kwargs)
        return outputs, LinearLogits(logits.hidden[:, :-1], logits.weight, logits.bias)

    def _teacher_signal(self, inputs: dict, needs_hidden: bool, fused: bool):
        """Dense logits from the live teacher, or the sparse top-k carried by the batch."""
        if "topk_ids" in inputs:
            return SparseSignal(inputs["topk_ids"], inputs["topk_logprobs"], inputs.get("topk_tail")), None
        if self.teacher is None:
            return None, None
        with torch.no_grad():
            out, logits = self._forward(self.teacher, inputs["input_ids"], inputs.get("attention_mask"), needs_hidden,
                                        fused)  # fmt: skip
        return logits, (out.hidden_states if needs_hidden else None)

    # ----------------------------------------------------------------- on-policy batches (GKD)
    def training_step(self, model, inputs, num_items_in_batch=None):
        """With probability onpolicy.lmbda, train on the student's own samples of the batch prompts."""
        step = self.state.global_step
        self._micro_batch = (step, self._micro_batch[1] + 1 if self._micro_batch[0] == step else 0)
        active = self.onpolicy is not None and self.onpolicy.lmbda > 0 and step >= getattr(self.onpolicy, "start_step", 0)
        draw = micro_batch_rng(self.args.seed, *self._micro_batch) if active else None  # nothing to checkpoint
        if draw is not None and draw.random() < self.onpolicy.lmbda:
            tok = self.processing_class
            student = self.accelerator.unwrap_model(model)
            eos = eos_token_ids(student, tok)
            seed = draw.randrange(2**31) + self.args.process_index  # each process samples its own prompts apart
            inputs, num_items_in_batch = onpolicy_inputs(
                self.accelerator.unwrap_model(model), self._prepare_inputs(inputs), self.onpolicy,
                pad_id=tok.pad_token_id, eos_ids=eos, seed=seed, scorer=self.scorer, hook=self.onpolicy_hook,
                scale=self.args.gradient_accumulation_steps * self.accelerator.num_processes,
            )
        return super().training_step(model, inputs, num_items_in_batch)

    def _cross_signal(self, extra: dict, targets: torch.Tensor, fused: bool):
        """Teacher logits on its own tokenization, aligned to the student's response positions by character offset
        (with `fused`, its hidden states are aligned and projected inside the loss); plus the (batch, seq) mask
        of positions whose two tokens are the same string (None without an offset alignment)."""
        with torch.no_grad():
            _, logits = self._forward(self.teacher, extra["teacher_input_ids"], extra.get("teacher_attention_mask"),
                                      False, fused)  # fmt: skip
        rows = logits.hidden if isinstance(logits, LinearLogits) else logits
        aligned, mask = align_responses(rows, extra["teacher_labels"][:, 1:], targets, extra.get("teacher_index"))
        if isinstance(logits, LinearLogits):
            aligned = LinearLogits(aligned, logits.weight, logits.bias)
        exact = extra.get("teacher_exact")
        return aligned, mask, (None if exact is None else place_counted(exact, targets))

    @staticmethod
    def _weighted(fn, logits, teacher, mask, kwargs: dict, weights: torch.Tensor | None) -> torch.Tensor:
        """fn with per-example loss weights (batch,): one call per distinct weight, masks split by example."""
        if weights is None or bool((weights == 1).all()):
            return fn(logits, teacher, mask, **kwargs)
        value = torch.zeros((), dtype=torch.float32, device=mask.device)
        for w in weights.unique().tolist():
            if w != 0:
                rows = (weights == w).to(mask.device)[:, None]
                with shared_scale(w):  # a loss deferred to the shared projection pass is weighted there
                    value = value + w * fn(logits, teacher, mask & rows, **kwargs)
        return value

    def _teacher_sides(self, entries: list, inputs: dict, extra: dict, targets, mask, needs_hidden: bool,
                       fused: bool) -> dict:  # fmt: skip
        """What each kind of loss compares against (see distill.losses.registry.Loss.teacher): (teacher, mask)."""
        kinds = {entry.teacher for _, entry in entries}
        sides: dict = {"labels": (targets, mask)}
        cross = "teacher_input_ids" in extra and self.teacher is not None
        if cross and "tokenizer" in kinds:  # the teacher reads its own ids (see _cross_signal)
            aligned, aligned_mask, sides["exact"] = self._cross_signal(extra, targets, fused)
            sides["tokenizer"] = (aligned, mask & aligned_mask)
        if kinds & {"signal", "hidden"} or ("tokenizer" in kinds and not cross):
            signal, sides["hidden"] = self._teacher_signal(inputs, needs_hidden, fused)
            if signal is None:
                raise ValueError(
                    "train.losses asks for a teacher divergence but there is no teacher signal: use "
                    "train.signal=online (a local teacher) or offline (a store with top-k), or only cross_entropy"
                )
            sides["signal"] = (signal, mask)
            sides.setdefault("tokenizer", sides["signal"])
        return sides

    def _component(self, spec: LossSpec, entry, student, outputs, sides: dict, labels, num_items, extra: dict):
        """One weighted loss component, fed what its registry entry says it needs."""
        params = dict(spec.params or {})
        context = {"projections": self.projections}
        if self.cross_tokenizer is not None:
            context.update(teacher_vocab_size=self.cross_tokenizer.teacher_vocab_size, matched=self.cross_tokenizer.matched,
                           exact=sides.get("exact"))  # fmt: skip
        params.update({k: context[k] for k in entry.context if k in context})
        if entry.student == "hidden":
            if sides.get("hidden") is None:
                raise ValueError(f"{spec.name} needs an online teacher (train.signal=online)")
            return entry(outputs.hidden_states, sides["hidden"], labels != -100, num_items_in_batch=num_items, **params)
        teacher, mask = sides[entry.teacher]
        kwargs = dict(temperature=spec.temperature, scale_temperature=self.scale_temperature, sparse_mode=self.sparse_mode,
                      chunk_size=self.chunk_size, vocab_size=self.vocab_size, num_items_in_batch=num_items, **params)
        return self._weighted(entry, student, teacher, mask, kwargs, extra.get("loss_weight"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        extra = {k: inputs.pop(k) for k in EXTRA_KEYS if k in inputs}
        entries = [(spec, LOSSES[spec.name]) for spec in self.loss_specs]
        if "onpolicy" in extra:  # the labels of a sampled batch are the student's own tokens
            entries = [(spec, entry) for spec, entry in entries if entry.needs_teacher]
        needs_hidden = any(entry.student == "hidden" for _, entry in entries)
        fused = self.fused and SAMPLED_KEY not in extra
        outputs, logits = self._forward(model, inputs["input_ids"], inputs.get("attention_mask"), needs_hidden, fused)
        targets = labels[:, 1:]
        mask = targets != -100
        if num_items_in_batch is None:  # evaluation, or a caller outside the Trainer loop
            num_items_in_batch = mask.sum()
        num_items = num_items_in_batch.to(mask.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        if SAMPLED_KEY in extra:  # on-policy batch scored by an API teacher: sampled reverse KL only
            entries, total = [], sampled_reverse_kl(logits, targets, extra[SAMPLED_KEY], mask, num_items_in_batch=num_items)
            self._record("sampled_reverse_kl", total, model)
        else:
            sides = self._teacher_sides(entries, inputs, extra, targets, mask, needs_hidden, fused)
            total = torch.zeros((), dtype=torch.float32, device=mask.device)
        # the fused logit losses are deferred to one pass that projects each chunk through lm_head once for all
        with shared_projection() as shared:
            values = []
            for i, (spec, entry) in enumerate(entries):
                with shared.component(i, spec.weight):
                    values.append(self._component(spec, entry, logits, outputs, sides, labels, num_items, extra))
        fused_total, fused_values = shared.run()
        if fused_total is not None:
            total = total + fused_total
        for i, ((spec, _), value) in enumerate(zip(entries, values)):
            total = total + spec.weight * value
            self._record(spec.name, value + fused_values.get(i, 0.0), model)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # DDP averages gradients over processes; our loss is already divided by the global count.
            total = total * self.accelerator.num_processes
        if model.training:  # a NaN / inf loss stops here, before backward turns every weight into NaN
            check_finite_loss(total, self.state.global_step, self.args.output_dir)
        return (total, outputs) if return_outputs else total

    def _record(self, name: str, value: torch.Tensor, model) -> None:
        if model.training:  # logged per micro-batch as the share of the global batch; summed back in `log`
            self._component_sums[name].append(float(value.detach()))

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
                logs[f"{COMPONENT_PREFIX}{name}"] = round(total / max(1, len(self._component_sums[name]) / steps), 6)
            self._component_sums.clear()
        super().log(logs, *args, **kwargs)


def average_grads(module: torch.nn.Module, accelerator) -> None:
    """Average `module`'s gradients over processes (the learned projections live outside the DDP/FSDP-wrapped
    student, so nothing else syncs them)."""
    if accelerator.num_processes > 1:
        for param in module.parameters():
            if param.grad is not None:
                param.grad = accelerator.reduce(param.grad, reduction="mean")


class AverageProjectionGrads(TrainerCallback):
    """Under DeepSpeed (which clips inside its engine): average the projections' gradients before each step."""

    def __init__(self, projections: torch.nn.Module, accelerator):
        self.projections, self.accelerator = projections, accelerator

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        average_grads(self.projections, self.accelerator)


PROJECTIONS_FILE = "projections.safetensors"  # beside the student's weights in every checkpoint-N


def save_projections(projections: torch.nn.Module, directory) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()}
    save_file(state, str(Path(directory) / PROJECTIONS_FILE))


def load_projections(projections: torch.nn.Module, directory) -> None:
    """Projection weights from a checkpoint; a checkpoint without them cannot be resumed faithfully."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(directory) / PROJECTIONS_FILE
    if not path.exists():
        raise ValueError(
            f"{directory}: no {PROJECTIONS_FILE} in this checkpoint (written before hidden-state projections were "
            "checkpointed, or by a run without hidden losses); delete the checkpoint or set train.resume=false"
        )
    state = load_file(str(path))
    try:
        projections.load_state_dict(state)
    except RuntimeError as exc:  # another layer_map or width than the run that wrote it
        raise ValueError(f"{path}: does not fit this run's projections (layer_map or widths changed): "
                         f"{str(exc).splitlines()[0]}; set train.resume=false to start over") from None


class SaveProjections(TrainerCallback):
    """The projections are not part of the student, so the Trainer does not save them: write them into each
    checkpoint it saves (the main process only), for `DistillationTrainer.train` to restore on resume."""

    def __init__(self, projections: torch.nn.Module):
        self.projections = projections

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from pathlib import Path

            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if directory.is_dir():
                save_projections(self.projections, directory)


def attention_mask_for_hidden(inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Hidden states are compared on completion tokens (unshifted positions with a label)."""
    return labels != -100
