"""`student.init: minitron`: a smaller student cut out of the teacher by activation-based importance.

NVIDIA's Minitron ("Compact Language Models via Pruning and Knowledge Distillation", Muralidharan et al.,
2024) ranks every prunable unit by how strongly it fires on a few hundred calibration prompts, keeps the top
ones and copies their weights; distillation then repairs what was cut. Dropping whole layers alone cannot
reach 10x on models whose embeddings dominate; pruning width keeps what the teacher knows in every layer.

Importance, from one forward pass of the teacher over the calibration prompts (each score is the mean over a
prompt's real tokens, then the L2 norm over prompts: the paper's best "batch=L2, seq=mean" aggregation):
- attention heads: the L2 norm of each head's output (the input of o_proj); a key/value group (GQA) is scored
  by the sum of its query heads and kept or dropped whole, so the query-to-key/value mapping stays intact;
- MLP channels: |activation| entering down_proj;
- embedding (hidden) channels: |output| of every RMSNorm over the hidden size (the inputs of every block);
  the norms' weights, the embeddings (tied or not) and every projection are sliced on the same channels;
- layers: block importance, 1 - cos(input, output) of the layer (ShortGPT / Minitron's depth metric).
head_dim is kept: the kept heads are the teacher's heads, unchanged.

Shape (`choose_shape`): the sizes given, the others scaled down together to fit student.target_params, each a
valid config (hidden a multiple of the heads, whole key/value groups; checked with the family's own config
validation, at preflight too), widths no narrower than MIN_WIDTH of the teacher's while layers can go instead.
`distill sweep` shapes its fresh (`init: config`) students with the same search, keeping the teacher's heads
and shrinking head_dim instead (`keep_heads`).

Run as: `distill train cfg.yaml student.init=minitron student.target_params=100000`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from distill.modeling import count_parameters

if TYPE_CHECKING:
    from distill.config import Config, StudentConfig

# Shape fields a user may give in student.config (the teacher config's own names) plus student.num_layers.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
_ROUND = 8  # widths are rounded to a multiple of this (kernels like it), never below it
# With a parameter target, widths shrink to this fraction of the teacher's before a layer is dropped: a quarter
# keeps every MLP at hundreds of channels on real models (a 16-wide MLP at full depth learns next to nothing).
MIN_WIDTH = 0.25
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class Shape:
    """The student's size: widths, heads and depth."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int | None = None  # None: the teacher's (minitron keeps it; a fresh student may shrink it)


@dataclass
class Importance:
    """Scores, higher = keep. hidden: (hidden,); heads: (layers, kv_groups); mlp: (layers, intermediate);
    layers: (layers,)."""

    hidden: torch.Tensor
    heads: torch.Tensor
    mlp: torch.Tensor
    layers: torch.Tensor


def teacher_shape(config) -> Shape:
    missing = [f for f in SHAPE_FIELDS if f != "num_key_value_heads" and not isinstance(getattr(config, f, None), int)]
    if missing:
        raise ValueError(f"student.init=minitron: {type(config).__name__} has no {', '.join(missing)}: not a "
                         "Llama-style decoder; use student.init=prune or config")
    heads = config.num_attention_heads
    return Shape(
        config.hidden_size,
        config.intermediate_size,
        heads,
        getattr(config, "num_key_value_heads", None) or heads,
        config.num_hidden_layers,
    )


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_supported(model: torch.nn.Module) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = layers is not None and len(layers) > 0
    if ok:
        layer = layers[0]
        ok = all(hasattr(layer, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))
        ok = ok and all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        ok = ok and all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))
    if not ok:
        raise ValueError(
            f"student.init=minitron: {type(model).__name__} is not a Llama-style decoder (model.layers[i] with "
            "self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj and RMSNorms); use student.init=prune or config"
        )


# ---------------------------------------------------------------- importance


def calibration_batches(prompt_ids: list[list[int]], pad_id: int, batch_size: int = 16):
    """Right-padded (input_ids, attention_mask) batches of the calibration prompts."""
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        yield ids, mask


class _Accumulator:
    """Sum over prompts of (per-prompt mean over real tokens)^2, for the batch=L2 / seq=mean aggregation."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def add(self, values: torch.Tensor) -> None:
        """values: (batch, seq, channels) non-negative activations."""
        m = self.mask.to(values.dtype).unsqueeze(-1)
        per_prompt = (values.float() * m).sum(1) / m.sum(1).clamp(min=1)
        part = (per_prompt**2).sum(0)
        self.total = part if self.total is None else self.total + part

    def result(self) -> torch.Tensor:
        return self.total.sqrt()


def importance(teacher: torch.nn.Module, prompt_ids: list[list[int]], pad_id: int, batch_size: int = 16) -> Importance:
    """Activation-based importance of heads, MLP channels, hidden channels and layers on `prompt_ids`."""
    _check_supported(teacher)
    if not prompt_ids:
        raise ValueError("student.calibration: no calibration prompts to rank the teacher's units with")
    cfg = teacher.config
    shape, head_dim = teacher_shape(cfg), _head_dim(cfg)
    layers = teacher.model.layers
    heads = [_Accumulator() for _ in layers]
    mlp = [_Accumulator() for _ in layers]
    hidden = _Accumulator()
    accs = [*heads, *mlp, hidden]
    hooks = []
    for i, layer in enumerate(layers):
        def head_hook(_, args, acc=heads[i]):
            x = args[0]
            acc.add(x.reshape(*x.shape[:2], shape.num_attention_heads, head_dim).norm(dim=-1))

        def mlp_hook(_, args, acc=mlp[i]):
            acc.add(args[0].abs())

        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook))
    norms = [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms += [teacher.model.norm] if hasattr(teacher.model, "norm") else []
    for norm in norms:
        hooks.append(norm.register_forward_hook(lambda _m, _a, out: hidden.add(out.abs())))
    block = torch.zeros(len(layers))
    current: dict[str, torch.Tensor] = {}  # the real-token mask of the batch being run

    def block_hook(module, args, kwargs, output, index):
        # the layer's own input and output (the model's hidden_states[-1] is after the final norm)
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        m = current["mask"]
        cos = torch.nn.functional.cosine_similarity(x[m].float(), y[m].float(), dim=-1)
        block[index] += (1 - cos).sum().cpu()

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(
            lambda mod, a, kw, out, i=i: block_hook(mod, a, kw, out, i), with_kwargs=True))
    n_tokens = 0
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    try:
        with torch.inference_mode():
            for ids, mask in calibration_batches(prompt_ids, pad_id, batch_size):
                for acc in accs:
                    acc.mask = mask.to(device)
                current["mask"] = mask.to(device).bool()
                teacher(input_ids=ids.to(device), attention_mask=mask.to(device))
                n_tokens += int(current["mask"].sum())
    finally:
        for h in hooks:
            h.remove()
        teacher.train(was_training)
    ratio = shape.num_attention_heads // shape.num_key_value_heads
    per_head = torch.stack([a.result() for a in heads]).cpu()  # (layers, heads)
    return Importance(
        hidden=hidden.result().cpu(),
        heads=per_head.reshape(len(layers), shape.num_key_value_heads, ratio).sum(-1),
        mlp=torch.stack([a.result() for a in mlp]).cpu(),
        layers=block / max(1, n_tokens),
    )


def random_importance(config, seed: int = 0) -> Importance:
    """Random scores of the right shapes: the control that importance ranking must beat."""
    g = torch.Generator().manual_seed(seed)
    s = teacher_shape(config)
    return Importance(
        hidden=torch.rand(s.hidden_size, generator=g),
        heads=torch.rand(s.num_hidden_layers, s.num_key_value_heads, generator=g),
        mlp=torch.rand(s.num_hidden_layers, s.intermediate_size, generator=g),
        layers=torch.rand(s.num_hidden_layers, generator=g),
    )


# ---------------------------------------------------------------- target shape


def _round_width(value: float, limit: int, step: int = _ROUND) -> int:
    return min(limit, max(step, step * round(value / step)))


def _hidden_step(heads: int, limit: int) -> int:
    """Hidden sizes are multiples of the head count (Llama's config refuses others at save_pretrained) and of
    _ROUND where the teacher's width leaves room for that."""
    step = math.lcm(_ROUND, heads)
    return step if step <= limit else heads


def student_config(teacher_config, shape: Shape, kept_layers: list[int]):
    """The teacher's config at the student's shape (head_dim kept, per-layer lists cut to the kept layers)."""
    cfg = copy.deepcopy(teacher_config)
    n_teacher = teacher_config.num_hidden_layers
    head_dim = _head_dim(teacher_config)
    for name in SHAPE_FIELDS:
        setattr(cfg, name, getattr(shape, name))
    cfg.head_dim = shape.head_dim or head_dim
    for name, value in list(vars(cfg).items()):  # per-layer lists, e.g. layer_types for sliding windows
        if isinstance(value, list) and len(value) == n_teacher and name != "architectures":
            setattr(cfg, name, [value[i] for i in kept_layers])
    return cfg


def check_student_shape(teacher_config, shape: Shape) -> None:
    """ValueError (naming student.config) for a shape whose config the first forward pass or save_pretrained
    would refuse: checked before any weight is cut, and at preflight, before generation."""
    from distill.students.shapes import check_shape

    check_shape(student_config(teacher_config, shape, list(range(shape.num_hidden_layers))))


def shape_params(teacher_config, shape: Shape) -> int:
    """Parameters of a model of `shape`: models of 1 and 2 layers are built on the meta device (no memory,
    exact for the family) and the per-layer count extrapolated, as the decoder layers of a shape are alike."""
    from transformers import AutoModelForCausalLM

    counts = []
    for layers in (1, 2):
        cfg = student_config(teacher_config, dataclasses.replace(shape, num_hidden_layers=layers), list(range(layers)))
        with torch.device("meta"):
            counts.append(count_parameters(AutoModelForCausalLM.from_config(cfg)))
    return counts[0] + (shape.num_hidden_layers - 1) * (counts[1] - counts[0])


def _scaled(t: Shape, fixed: dict[str, int], s: float, layers: int) -> Shape:
    """The teacher's shape with every width not in `fixed` scaled by `s` (key/value groups kept whole, hidden a
    multiple of the heads)."""
    ratio = t.num_attention_heads // t.num_key_value_heads
    kv = fixed.get("num_key_value_heads")
    if kv is None and "num_attention_heads" in fixed:
        kv = fixed["num_attention_heads"] // ratio
    if kv is None:
        kv = max(1, min(t.num_key_value_heads, round(s * t.num_key_value_heads)))
        while "hidden_size" in fixed and kv > 1 and fixed["hidden_size"] % (kv * ratio):
            kv -= 1  # a given hidden size: as many heads as divide it
    heads = kv * ratio
    step = _hidden_step(heads, t.hidden_size)
    return Shape(
        fixed.get("hidden_size") or _round_width(s * t.hidden_size, t.hidden_size // step * step, step),
        fixed.get("intermediate_size") or _round_width(s * t.intermediate_size, t.intermediate_size),
        heads,
        kv,
        layers,
    )


def _scaled_keeping_heads(t: Shape, fixed: dict[str, int], s: float, layers: int) -> Shape:
    """The teacher's shape with hidden and MLP widths not in `fixed` scaled by `s`, its query and key/value heads
    kept and head_dim = hidden / heads shrinking with the width (even, for rotary embeddings): for a fresh
    student, which copies no head and so need not keep their size."""
    heads = fixed.get("num_attention_heads", t.num_attention_heads)
    kv = fixed.get("num_key_value_heads", heads // (t.num_attention_heads // t.num_key_value_heads))
    step = _hidden_step(2 * heads, t.hidden_size)
    hidden = fixed.get("hidden_size") or _round_width(s * t.hidden_size, t.hidden_size // step * step, step)
    intermediate = fixed.get("intermediate_size") or _round_width(s * t.intermediate_size, t.intermediate_size)
    return Shape(hidden, intermediate, heads, kv, layers, head_dim=hidden // heads)


def _fixed_sizes(t: Shape, cfg: StudentConfig) -> dict[str, int]:
    """The sizes given in student.config / student.num_layers, checked against the teacher."""
    unknown = sorted(set(cfg.config) - set(SHAPE_FIELDS))
    if unknown:
        raise ValueError(f"student.config.{unknown[0]}: minitron sets only {', '.join(SHAPE_FIELDS)}")
    fixed = {k: int(v) for k, v in cfg.config.items()}
    if cfg.num_layers is not None:
        fixed["num_hidden_layers"] = cfg.num_layers
    ratio = t.num_attention_heads // t.num_key_value_heads
    for name, value in fixed.items():
        if not 1 <= value <= getattr(t, name):
            raise ValueError(f"student.config.{name}={value}: must be between 1 and the teacher's {getattr(t, name)}")
    if "num_attention_heads" in fixed and (fixed["num_attention_heads"] % ratio or (
        "num_key_value_heads" in fixed and fixed["num_attention_heads"] != fixed["num_key_value_heads"] * ratio
    )):
        raise ValueError(
            f"student.config.num_attention_heads={fixed['num_attention_heads']}: key/value groups are kept whole, "
            f"so it must be num_key_value_heads x {ratio} (the teacher's query heads per key/value head)"
        )
    return fixed


def choose_shape(teacher_config, cfg: StudentConfig, keep_heads: bool = False) -> Shape:
    """The student's shape: the sizes given in student.config / student.num_layers, and the other widths
    scaled down together to the largest model within student.target_params. Depth is kept while the widths
    stay at MIN_WIDTH of the teacher's or more (Minitron prefers width pruning); past that a layer is dropped
    rather than shrinking every MLP to a few channels (with one layer left, or a depth given, widths go lower).
    The result is checked as a config (`check_student_shape`). `keep_heads` (fresh students of `distill sweep`):
    the teacher's heads are kept and head_dim shrinks instead of whole key/value groups being dropped."""
    t = teacher_shape(teacher_config)
    fixed = _fixed_sizes(t, cfg)
    scaled = functools.partial(_scaled_keeping_heads if keep_heads else _scaled, t, fixed)
    if cfg.target_params is None:
        if not fixed:
            raise ValueError("student.init=minitron needs student.target_params or sizes in student.config "
                             f"({', '.join(SHAPE_FIELDS)})")
        shape = scaled(1.0, fixed.get("num_hidden_layers", t.num_hidden_layers))
        check_student_shape(teacher_config, shape)
        return shape
    sizes: dict[Shape, int] = {}

    def fits(shape: Shape) -> bool:
        if shape not in sizes:
            sizes[shape] = shape_params(teacher_config, shape)
        return sizes[shape] <= cfg.target_params

    depths = [fixed["num_hidden_layers"]] if "num_hidden_layers" in fixed else range(t.num_hidden_layers, 0, -1)
    for layers in depths:
        lo = MIN_WIDTH if len(depths) > 1 and layers > 1 else 0.0
        if not fits(scaled(lo, layers)):
            continue  # even the narrowest model allowed at this depth is too big
        hi = 1.0
        for _ in range(20):  # bisection: parameters grow with the width factor
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(scaled(mid, layers)) else (lo, mid)
        shape = scaled(lo, layers)
        check_student_shape(teacher_config, shape)
        return shape
    raise ValueError(
        f"student.target_params={cfg.target_params}: even the narrowest student "
        f"({narrowest_shape(teacher_config, cfg, keep_heads)}) "
        "is larger; raise the target or give smaller sizes in student.config"
    )


def narrowest_shape(teacher_config, cfg: StudentConfig, keep_heads: bool = False) -> Shape:
    """The smallest shape `choose_shape` can reach with the sizes given in student.config: every other width at
    its floor (one key/value group, or with `keep_heads` a head_dim of 2; 8 MLP channels) and one layer unless a
    depth is given. Its parameters bound the largest compression a target can ask for (the embeddings alone are
    often most of it)."""
    t = teacher_shape(teacher_config)
    fixed = _fixed_sizes(t, cfg)
    scaled = _scaled_keeping_heads if keep_heads else _scaled
    return scaled(t, fixed, 0.0, fixed.get("num_hidden_layers", 1))


# ---------------------------------------------------------------- cutting the weights


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (so kept units keep their relative order)."""
    return torch.topk(scores.float(), k).indices.sort().values


def prune(teacher: torch.nn.Module, shape: Shape, imp: Importance) -> tuple[torch.nn.Module, list[int]]:
    """A new model of `shape` holding the teacher's most important layers, heads, channels; all weights copied.
    Returns the model and the kept teacher layers."""
    from transformers import AutoModelForCausalLM

    _check_supported(teacher)
    t_cfg = teacher.config
    t = teacher_shape(t_cfg)
    head_dim, ratio = _head_dim(t_cfg), t.num_attention_heads // t.num_key_value_heads
    kept_layers = _top(imp.layers, shape.num_hidden_layers).tolist()
    hid = _top(imp.hidden, shape.hidden_size)

    def rows_of(groups: torch.Tensor, per_group: int) -> torch.Tensor:
        return (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)

    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER.match(key)
        if m is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if value.dim() == 0 or value.shape[-1] != t.hidden_size:
                raise ValueError(f"student.init=minitron: cannot slice '{key}' {tuple(value.shape)} on the hidden size")
            state[key] = value[..., hid]  # embeddings, lm_head (tied or not), final norm: the kept channels
            continue
        old, name = int(m.group(1)), m.group(2)
        if old not in kept_layers:
            continue
        groups = _top(imp.heads[old], shape.num_key_value_heads)
        q_rows, kv_rows = rows_of(rows_of(groups, ratio), head_dim), rows_of(groups, head_dim)
        neurons = _top(imp.mlp[old], shape.intermediate_size)
        module, _, kind = name.rpartition(".")
        leaf = module.rpartition(".")[2]
        if leaf in ("input_layernorm", "post_attention_layernorm"):
            value = value[hid]  # sliced as Minitron does (rescaling by the kept channels' RMS measured worse)
        elif leaf == "q_proj":
            value = value[q_rows][:, hid] if kind == "weight" else value[q_rows]
        elif leaf in ("k_proj", "v_proj"):
            value = value[kv_rows][:, hid] if kind == "weight" else value[kv_rows]
        elif leaf == "o_proj":
            value = value[hid][:, q_rows] if kind == "weight" else value[hid]
        elif leaf in ("gate_proj", "up_proj"):
            value = value[neurons][:, hid] if kind == "weight" else value[neurons]
        elif leaf == "down_proj":
            value = value[hid][:, neurons] if kind == "weight" else value[hid]
        elif leaf not in ("q_norm", "k_norm"):  # per-head norms (Qwen3) work on head_dim, which is kept
            raise ValueError(f"student.init=minitron: no rule to prune '{key}'; use student.init=prune or config")
        state[f"model.layers.{kept_layers.index(old)}.{name}"] = value.clone()
    cfg = student_config(t_cfg, shape, kept_layers)
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"minitron left weights unmatched: missing={missing[:5]} unexpected={unexpected[:5]}")
    return student.to(next(teacher.parameters()).device), kept_layers


def kl_to_teacher(teacher: torch.nn.Module, student: torch.nn.Module, prompt_ids: list[list[int]],
                  pad_id: int = 0) -> float:
    """Mean KL(teacher || student) in nats per real token of `prompt_ids`: how much of the teacher a pruned
    student kept before any training (the figure importance ranking is judged by)."""
    total = count = 0.0
    for ids, mask in calibration_batches(prompt_ids, pad_id, 32):
        with torch.inference_mode():
            t = torch.log_softmax(teacher(ids, attention_mask=mask).logits.float(), -1)
            s = torch.log_softmax(student(ids, attention_mask=mask).logits.float(), -1)
        total += float(((t.exp() * (t - s)).sum(-1) * mask).sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


# ---------------------------------------------------------------- calibration prompts and the entry point


def calibration_prompts(cfg: Config, tokenizer) -> list[list[int]]:
    """Token ids of the calibration prompts: student.calibration (a prompts file), else generate.input, else
    train.input; the first student.calibration_samples of them, rendered as the models see prompts."""
    from distill.data.prompts import load_records, render_prompt

    s = cfg.student
    source = s.calibration or cfg.generate.input or cfg.train.input
    if source is None:
        raise ValueError("student.calibration: set a prompts file to rank the teacher's units with "
                         "(or generate.input / train.input)")
    records = load_records(source, cfg.data, limit=s.calibration_samples)
    use_template = cfg.data.chat_template and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for r in records:
        ids = tokenizer(render_prompt(r, tokenizer, cfg.data), add_special_tokens=not use_template)["input_ids"]
        out.append(ids[: cfg.train.max_length])
    return out


def minitron_student(
    cfg: StudentConfig, teacher: torch.nn.Module, prompt_ids: list[list[int]] | None, pad_id: int | None
) -> tuple[torch.nn.Module, list[int], list[str]]:
    """Rank, choose the shape, cut: (student, kept teacher layers, notes for the summary)."""
    if not prompt_ids:
        raise ValueError("student.init=minitron needs calibration prompts (student.calibration or generate.input)")
    shape = choose_shape(teacher.config, cfg)
    imp = importance(teacher, prompt_ids, 0 if pad_id is None else pad_id)
    student, kept = prune(teacher, shape, imp)
    notes = [f"minitron: {shape} from {len(prompt_ids)} calibration prompts; kept layers {kept}"]
    return student, kept, notes
