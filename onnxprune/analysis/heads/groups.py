"""Attention heads and FFN neurons as prunable groups, found in exported ONNX graphs.

**What is found.** Multi-head attention in the decomposed forms torch.onnx writes (legacy and
dynamo exporters), fused Q/K/V projections (one MatMul/Gemm, then Split or last-axis Slices),
grouped-query and multi-query attention (K/V heads repeated by ``Unsqueeze -> Expand|Tile ->
Reshape``), rotary embeddings (rotate-half on the head dimension), and the fused operators
``com.microsoft`` ``Attention`` / ``MultiHeadAttention`` / ``GroupQueryAttention`` and ai.onnx
opset-23 ``Attention`` (3-D inputs with ``q_num_heads``/``kv_num_heads``, or 4-D inputs).
Feed-forward blocks (up projection, element-wise activation, optional gate, down projection) are
found by the same engine. Blocked, with the reason: KV-cache inputs/outputs (graph I/O would
change shape), heads tiled non-consecutively, any op without a rule that reads a head-carrying
tensor, shape elements computed in ways that cannot be rewritten, shared weights.

**How (head factors).** Every tensor that carries heads gets an annotation ``(axis, o, n, b)``:
axis ``axis`` of length ``o * n * b`` holds ``n`` heads as its middle factor (``o`` outer, ``b``
inner elements per head). Annotations start at *split reshapes* ``[..., n*D] -> [..., n, D]``
and are carried forward in topological order with per-op rules, using static shapes from ONNX
shape inference on a copy whose dynamic input dims are set to fixed values:

* Transpose / Unsqueeze / Squeeze move the axis; element-wise ops keep it (other operands must
  broadcast over it, or be per-head constants); Softmax / Reduce / Slice / Split / Concat must not
  act on it; a MatMul whose operands both carry heads on a batch axis is an attention *core* and
  joins their streams;
* a Reshape keeps the factor if it lies within one output axis: with ``pre = prod(I[:axis]) * o``
  the new axis ``j`` satisfies ``prod(O[:j]) | pre`` and ``pre * n | prod(O[:j+1])``. This covers
  ``[B,S,H,D] -> [B,S,H*D]`` (the exit, ``b = D``), ``[B,H,S,D] -> [B*H,S,D]`` (``o = B``) and
  the GQA repeat ``[B,Hkv,g,S,D] -> [B,Hkv*g,S,D]`` (``n = Hkv``, ``b = g``);
* the *exit* is a MatMul/Gemm with a constant weight that contracts over an annotated last axis
  with ``o = 1`` (the output projection).

Streams joined by cores form one block. Its prunable unit count is ``W = min n`` over the block
(the KV heads for GQA: each owns ``Hq / Hkv`` query heads); every annotated axis then owns
``len / W`` consecutive positions per unit. The block becomes a
:class:`~onnxprune.analysis.removal.PruneGroup`: Q/K/V projection columns and biases (traced back
from the split reshapes through Add, Split, last-axis-keeping Reshapes, to MatMul/Gemm),
output-projection rows (role ``in``), per-head constants, and a :class:`ShapeEdit` for every
literal shape element that holds a head count or ``H*D`` (Reshape targets, Concat-built shape
pieces, Expand shapes, Split sizes, ``num_heads``-style attributes). Elements that are ``-1``, a
``0`` copy of an annotated axis, or a ``Shape`` of an annotated tensor update themselves.
Anything that cannot be accounted for blocks the group with a reason; nothing is guessed.

**Exactness.** Removing unit ``u`` equals zeroing its output-projection rows: heads never mix
(softmax and the score/context MatMuls are per head), so the other heads' outputs are unchanged.
For FFN groups (``n = N`` intermediate neurons, every op element-wise per neuron) removal equals
zeroing the down projection's input rows.

Preconditions: a topologically sorted graph with static head and channel counts; the model
should go through :func:`prepare_model` first (it names nodes, turns Constant nodes and
``Identity(initializer)`` into initializers and gives each consumer its own copy of small shared
initializers, so shape edits never touch a constant used elsewhere).

Layout: :mod:`~onnxprune.analysis.heads.prepare` (:func:`prepare_model`),
:mod:`~onnxprune.analysis.heads.shapes` (:func:`static_shapes`),
:mod:`~onnxprune.analysis.heads.state` (annotations, blocks, op sets),
:mod:`~onnxprune.analysis.heads.engine` (propagation engine),
:mod:`~onnxprune.analysis.heads.fused` (fused operators),
:mod:`~onnxprune.analysis.heads.ffn_blocks` (FFN starts),
:mod:`~onnxprune.analysis.heads.assemble` (groups from blocks); this module keeps the
public entry points.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxprune.analysis.heads.assemble import group_name
from onnxprune.analysis.heads.engine import Engine
from onnxprune.analysis.heads.shapes import static_shapes
from onnxprune.analysis.removal import PruneGroup
from onnxprune.ir.model import Model


# ---------------------------------------------------------------------- public API
@dataclass
class AttentionAnalysis:
    """Groups found in a model.

    Attributes:
        heads: One group per attention block (prunable or blocked with a reason).
        ffn: One group per feed-forward block.
        exits: Group name -> (exit node name, its input tensor) for calibration and compensation.
    """

    heads: list[PruneGroup]
    ffn: list[PruneGroup]
    exits: dict[str, list[tuple[str, str]]]


def find_groups(model: Model, mode: str, shapes: dict[str, list[int] | None] | None = None
                ) -> tuple[list[PruneGroup], dict[str, list[tuple[str, str]]]]:
    """Groups of one kind (``"heads"`` or ``"ffn"``) and, per group name, its exits.

    An exit is ``(node name, input tensor)`` of the projection that reads the group's channels
    (the output projection for heads, the down projection for FFNs): the tensor whose mean
    activations drive the ``activation`` criterion and bias compensation.
    """
    if mode not in ("heads", "ffn"):
        raise ValueError(f"mode must be heads or ffn, not {mode!r}")
    return _run(model, mode, shapes if shapes is not None else static_shapes(model))


def _run(model: Model, mode: str, shapes: dict[str, list[int] | None]) -> tuple[list[PruneGroup], dict]:
    eng = Engine(model, mode, shapes)
    eng.run()
    groups = eng.groups()
    exits: dict[str, list[tuple[str, str]]] = {}
    roots = {eng.find(c) for c in range(len(eng.parent))}
    by_name = {}
    for r in roots:
        comp = eng.comps[r]
        by_name[group_name(comp, mode)] = [(n, t) for n, t, _ in comp.exits]
    for g in groups:
        exits[g.name] = by_name.get(g.name, [])
    return groups, exits


def find_head_groups(model: Model, shapes: dict[str, list[int] | None] | None = None) -> list[PruneGroup]:
    """Attention-head groups of ``model`` (call :func:`prepare_model` first)."""
    return _run(model, "heads", shapes if shapes is not None else static_shapes(model))[0]


def find_ffn_groups(model: Model, shapes: dict[str, list[int] | None] | None = None) -> list[PruneGroup]:
    """FFN-neuron groups of ``model`` (call :func:`prepare_model` first)."""
    return _run(model, "ffn", shapes if shapes is not None else static_shapes(model))[0]


def analyze(model: Model, dims: dict[str, int] | None = None) -> AttentionAnalysis:
    """Heads and FFN groups of ``model`` with their exits (call :func:`prepare_model` first)."""
    shapes = static_shapes(model, dims)
    heads, ex1 = _run(model, "heads", shapes)
    ffn, ex2 = _run(model, "ffn", shapes)
    return AttentionAnalysis(heads, ffn, {**ex1, **ex2})
