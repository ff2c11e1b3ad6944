"""What a memory plan is made of and what it is: the model's shapes (:class:`Dims`, :class:`Inventory`),
the device (:class:`DeviceMemory`), the plan's byte rows (:class:`MemoryPlan`), and the rows of one
rank's block under ``model.shard: fsdp`` (:func:`block_rows`, :func:`local_numel`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mergeopt.errors import UserError
from mergeopt.loading.lora_sizes import FactorSizes
from mergeopt.memory.latent_attention import LatentAttention
from mergeopt.memory.layer_profiles import EXPERT_COUNT_KEYS, LLAMA, LayerProfile, profile_for
from mergeopt.memory.layer_shapes import LayerShape, gemma4_layers
from mergeopt.memory.linear_attention import LinearAttention

GIB = 2**30
FLOAT32 = 4
# regexes a user can add to model.exclude to keep the (usually largest) embedding tensors at θ0
EMBEDDING_PATTERNS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


def block_rows(rows: int, world_size: int) -> int:
    """⌈rows / N⌉: the rows of each rank's block, padding included (:func:`mergeopt.merging.sharded_merge.block_range`)."""
    return -(-rows // world_size)


def local_numel(shape: Sequence[int], world_size: int) -> int:
    """Elements one of ``world_size`` ranks keeps of a tensor of ``shape`` under ``model.shard: fsdp``:
    a block of ⌈R/N⌉ rows of a matrix (R = shape[0]), a vector whole."""
    if len(shape) < 2:
        return math.prod(shape)
    return block_rows(shape[0], world_size) * math.prod(shape[1:])


@dataclass(frozen=True)
class Gathers:
    """What a sharded stack (``model.shard: fsdp``) forms whole on each rank while a layer runs, in
    elements: the largest stacked matrix's block (⌈R/N⌉ rows) and its all-gather buffer (N blocks,
    padding rows included); what gathering the output layer holds at once (``head``: the rank's
    merged block of it when it is stacked, the all-gather buffer and, with padding rows, the padded
    copy of a rank's short block; :func:`~mergeopt.memory.phases.head_bytes`); what else is gathered whole while its module
    runs, the matrices not stacked and the LoRA factors kept low-rank (a module's A and B): in the
    largest decoder layer (``layer``, their sum, and ``unstacked``, the largest), and the largest
    anywhere (``unstacked_any``)."""

    block: int
    padded: int
    head: int = 0
    layer: int = 0
    unstacked: int = 0
    unstacked_any: int = 0


@dataclass(frozen=True)
class Dims:
    """The decoder shapes the activation estimate needs, read from config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    model_type: str = "llama"
    profile: LayerProfile = LLAMA  # what a layer keeps beyond its shapes (mergeopt.memory.layer_profiles)
    experts: int = 0  # a mixture-of-experts MLP: routed experts, experts per token, each one's width
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # a shared expert's width (Qwen2-MoE; GLM-4.5's shared experts together)
    expert_groups: tuple[int, int] = (1, 1)  # a grouped router's groups of experts, and those it picks
    dense_layers: int = 0  # a mixture of experts' first layers whose MLP is dense (first_k_dense_replace)
    rotary_dim: int | None = None  # rotary embedding's width per head, where partial (None: head_dim)
    linear_attention: LinearAttention | None = None  # gated DeltaNet layers' shapes (Qwen 3.5)
    linear_layers: int = 0  # how many layers are gated DeltaNet layers (config.json's layer_types)
    token_mixer: str = "attention"  # in a kind of layer (layer_kinds): "linear_attention" for those
    latent_attention: LatentAttention | None = None  # multi-head latent attention's widths (DeepSeek-V3)
    per_layer_input: int = 0  # Gemma 4's per-layer input width (hidden_size_per_layer_input)
    layer_shapes: tuple[tuple[LayerShape, int], ...] = ()  # widths per layer where they differ (Gemma 4)
    kv_shared: bool = False  # in a kind of layer: it reads another layer's keys and values
    k_eq_v: bool = False  # in a kind of layer: its values are its keys' projection
    moe_block: bool = False  # Gemma 4's mixture-of-experts block beside its dense MLP

    @property
    def linear_mixer(self) -> LinearAttention | None:
        """This kind of layer's gated DeltaNet shapes, where it is one (:meth:`layer_kinds`)."""
        return self.linear_attention if self.token_mixer == "linear_attention" else None

    @property
    def own_kv_heads(self) -> int:
        """Key-and-value heads this kind of layer projects itself (none where it reads another
        layer's: Gemma 4's kv-shared layers)."""
        return 0 if self.kv_shared else self.kv_heads

    @property
    def rotary_width(self) -> int:
        """The width of rotary embedding's cos and sin: head_dim, or its rotated part."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def on_device(self, device: str) -> Dims:
        """The shapes as the attention kernels of ``device`` run them (a latent attention's differ
        on a CPU: :meth:`~mergeopt.memory.latent_attention.LatentAttention.on_device`)."""
        if self.latent_attention is None:
            return self
        return replace(self, latent_attention=self.latent_attention.on_device(device))

    def layer_kinds(self) -> tuple[tuple[Dims, int], ...]:
        """The decoder's kinds of layer with their counts: a mixture of experts whose first
        layers are dense (GLM-4.5) has those as a dense kind of its own (no routed experts),
        gated DeltaNet layers (Qwen 3.5) are a kind of their own beside the attention layers, and
        layers of different widths (Gemma 4: :mod:`~mergeopt.memory.layer_shapes`) one kind per
        shape."""
        if self.layer_shapes:
            return tuple(
                (
                    replace(
                        self,
                        head_dim=shape.head_dim,
                        kv_heads=shape.kv_heads,
                        intermediate=shape.intermediate,
                        kv_shared=shape.kv_shared,
                        k_eq_v=shape.k_eq_v,
                        layer_shapes=(),
                    ),
                    n,
                )
                for shape, n in self.layer_shapes
            )
        if self.linear_layers:
            full = replace(self, layers=self.layers - self.linear_layers, linear_layers=0)
            linear = replace(full, layers=self.linear_layers, dense_layers=0, token_mixer="linear_attention")
            return tuple((k, n) for k, n in ((linear, self.linear_layers), *full.layer_kinds()) if n)
        if not self.profile.moe or not self.dense_layers:
            return ((self, self.layers),)
        dense = replace(
            self,
            profile=replace(self.profile, moe=False, shared_expert=None),
            experts=0,
            top_k=0,
            expert_intermediate=0,
            shared_intermediate=0,
            dense_layers=0,
        )
        return (dense, self.dense_layers), (self, self.layers - self.dense_layers)

    @property
    def mlp_gradient_width(self) -> int:
        """Per token, the widest activation gradient of the MLP's backward: the gated projection's
        input gradient (intermediate); a mixture of experts', for each of its top-k copies the
        fused gate and up projections' output (2 × the expert's width)."""
        if self.profile.moe:
            return max(2 * self.top_k * self.expert_intermediate, self.shared_intermediate)
        return self.intermediate

    @property
    def mlp_down_input(self) -> int:
        """Per token, the elements of the MLP output projection's input (top-k copies for a
        mixture of experts)."""
        return self.top_k * self.expert_intermediate if self.profile.moe else self.intermediate

    @classmethod
    def from_config(cls, config: dict, where: str) -> Dims:
        """Llama-style keys (GPT-2 aliases accepted); a multimodal config's text_config if present."""
        cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

        def pick(*keys: str, default: int | None = None) -> int:
            for key in keys:
                if isinstance(cfg.get(key), int):
                    return cfg[key]
            if default is None:
                raise UserError(f"{where}: config.json has no {keys[0]}: cannot estimate activations")
            return default

        hidden = pick("hidden_size", "n_embd", "d_model")
        heads = pick("num_attention_heads", "n_head")
        intermediate = pick("intermediate_size", "n_inner", default=4 * hidden)
        experts = pick(*EXPERT_COUNT_KEYS, default=0)
        head_dim = pick("head_dim", default=hidden // heads)
        rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
        layers = pick("num_hidden_layers", "n_layer", "num_layers")
        linear = LinearAttention.from_config(cfg, where)
        latent = LatentAttention.from_config(cfg, where)
        rotary_dim = int(head_dim * partial) if isinstance(partial, (int, float)) and partial != 1 else None
        if latent is not None:  # rotary embedding over each head's rotated part alone
            rotary_dim = latent.rope_dim
        linear_layers = list(cfg.get("layer_types") or ())[:layers].count("linear_attention") if linear else 0
        shared = pick("shared_expert_intermediate_size", default=0)
        if not shared and isinstance(cfg.get("n_shared_experts"), int):  # DeepSeek-V3's kind
            shared = cfg["n_shared_experts"] * pick("moe_intermediate_size", default=intermediate)
        profile = profile_for(cfg)
        kv_heads = pick("num_key_value_heads", default=heads)
        shapes = (
            gemma4_layers(cfg, where, head_dim, kv_heads, intermediate) if profile.per_layer_shapes else ()
        )
        return cls(
            hidden=hidden,
            intermediate=intermediate,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=pick("vocab_size"),
            model_type=str(cfg.get("model_type", "")),
            profile=profile,
            experts=experts,
            top_k=pick("num_experts_per_tok", "top_k_experts", default=0) if experts else 0,
            expert_intermediate=pick("moe_intermediate_size", default=intermediate) if experts else 0,
            shared_intermediate=shared if experts else 0,
            expert_groups=(pick("n_group", default=1), pick("topk_group", default=1)) if experts else (1, 1),
            dense_layers=min(pick("first_k_dense_replace", default=0), layers) if experts else 0,
            rotary_dim=rotary_dim,
            linear_attention=linear,
            linear_layers=linear_layers,
            latent_attention=latent,
            per_layer_input=pick("hidden_size_per_layer_input", default=0) if profile.per_layer_shapes else 0,
            layer_shapes=shapes,
            moe_block=bool(cfg.get("enable_moe_block")) and profile.per_layer_shapes,
        )


@dataclass(frozen=True)
class Inventory:
    """Every parameter of the base: shape and the bytes per element it is stored with on disk."""

    shapes: dict[str, tuple[int, ...]]
    source_bytes: dict[str, int]
    source: str  # where the shapes came from, for the printed plan
    notes: tuple[str, ...] = ()
    adapters: dict[str, FactorSizes] = field(default_factory=dict)  # LoRA experts, from their headers

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])


@dataclass(frozen=True)
class DeviceMemory:
    """The device a recipe resolves to, and its memory (None where it cannot be known here)."""

    device: str
    description: str
    total: int | None
    free: int | None

    @classmethod
    def given(cls, device: str, gib: float) -> DeviceMemory:
        """A device of ``gib`` GiB, all of it free, as a user names it (``--device-memory``): the plan
        for a GPU that is not on the machine planning (a login node, a laptop, a larger card)."""
        size = int(gib * GIB)
        return cls(device, "as given by --device-memory", size, size)


@dataclass(frozen=True)
class Row:
    label: str
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    """Byte rows held for the whole run, the transient phases (one at a time) and the verdict."""

    memory: DeviceMemory
    num_experts: int
    parameters: int
    tensors: int
    stacked_parameters: int
    stacked_tensors: int
    excluded_tensors: int
    held: tuple[Row, ...]
    phases: tuple[Row, ...]
    batch: str  # the batch shapes the phases assume, in words
    suggestions: tuple[tuple[str, int], ...] = field(default=())  # (override, bytes saved)
    combined_peak: int | None = None  # the peak with every suggestion applied
    # how many of the first suggestions (best first) make it fit together, when fewer than all do:
    # a knob that saves nothing once the others are applied changes the fit for no memory
    enough: int | None = None
    # (ranks, peak per rank): the fewest GPUs like this one over which model.shard=fsdp fits the
    # recipe as written, when it does not fit as planned
    sharded_fit: tuple[int, int] | None = None
    world_size: int = 1  # the ranks of a torchrun job; the rows are per rank
    shard: str = "none"  # model.shard: fsdp splits the matrices' rows over the ranks
    # LoRA experts alone under a linear merge: only what their adapters set densely is stacked
    adapters_only: bool = False

    def row(self, label_start: str) -> int:
        """Bytes of the first row (held or phase) whose label starts with ``label_start``."""
        return next(r.bytes for r in (*self.held, *self.phases) if r.label.startswith(label_start))

    @property
    def peak(self) -> int:
        return sum(r.bytes for r in self.held) + max((r.bytes for r in self.phases), default=0)

    @property
    def fits(self) -> bool | None:
        return None if self.memory.free is None else self.peak <= self.memory.free
